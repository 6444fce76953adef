"""Text generation with a decode graph (exported with --kv-cache) under ONNX Runtime.

    pangu-light run pruned.onnx --prompt "The capital of France is" --max-new-tokens 32
    pangu-light run pruned.onnx --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1

Several --prompt options run as one left-padded batch. The prompt is tokenized as plain text;
--chat wraps it as one user turn of the tokenizer's chat template instead. The tokenizer comes
from --tokenizer DIR or, by default, from the directory recorded in the graph's
pangu_light.tokenizer metadata at export. A sequence stops at the model's EOS token(s).

Greedy (arg-max) by default. --temperature T > 0 samples instead: softmax(logits / T), cut to
the --top-k most likely tokens and then to the --top-p nucleus; --seed makes the draws
reproducible (each prompt of the batch has its own stream).

A float16/bfloat16 graph on the CPU provider (which lacks half-precision kernels) runs as a
float32 copy of itself, weights widened exactly, and says so in one line.

--provider auto picks CANN (when the CANN libraries are present), else CUDA, else the CPU. The
providers really in use are printed at the end with the speed; a provider that fell back to
the CPU is reported with a warning (an error with --strict-provider). CANN options pass
through --provider-option KEY=VALUE (device_id, npu_mem_limit, precision_mode,
enable_cann_graph, op_select_impl_mode, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from pangu_light.core import contract
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.generate import generate
from pangu_light.runtime.sampling import Sampling, argmax_selector
from pangu_light.runtime.session import ProviderFallbackWarning, create_session
from pangu_light.runtime.tokenizer import find_tokenizer_dir, load_tokenizer
from pangu_light.tools.arguments import add_session_arguments, session_options_from_args

__all__ = ["HELP", "add_arguments", "run", "sampling_from_args"]

HELP = "greedy or sampled generation with a decode graph under ONNX Runtime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="decode graph (.onnx, exported with --kv-cache)")
    parser.add_argument(
        "--prompt", action="append", required=True, help="prompt text; repeat for a batch"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    add_session_arguments(parser)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="Hugging Face model directory with the tokenizer (default: from the graph's metadata)",
    )
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to each prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy")
    parser.add_argument("--top-k", type=int, help="sample from the K most likely tokens only (needs --temperature)")
    parser.add_argument(
        "--top-p", type=float, help="sample from the smallest set of tokens with probability >= P (needs --temperature)"
    )
    parser.add_argument("--seed", type=int, help="seed of the sampling draws (needs --temperature)")


def sampling_from_args(args: argparse.Namespace) -> Sampling | None:
    """The ``Sampling`` the options ask for, or None for greedy; sampling options without a
    temperature are an error rather than silently ignored."""
    given = [f"--{name.replace('_', '-')}" for name in ("top_k", "top_p", "seed") if getattr(args, name) is not None]
    if args.temperature == 0:
        if given:
            raise RuntimeUserError(
                f"{', '.join(given)} only apply when sampling: add --temperature T (T > 0), or drop them for greedy"
            )
        return None
    return Sampling(
        temperature=args.temperature,
        top_k=args.top_k if args.top_k is not None else 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise RuntimeUserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    sampling = sampling_from_args(args)
    from pangu_light.calib.half import float32_copy_for_cpu

    options = session_options_from_args(args)
    with (warnings.catch_warnings(record=True) as caught,
          float32_copy_for_cpu(args.model, "generation", options["provider"]) as runnable):
        warnings.simplefilter("always", ProviderFallbackWarning)
        info = create_session(runnable, **options)
    for warning in caught:
        if issubclass(warning.category, ProviderFallbackWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
    metadata = info.session.get_modelmeta().custom_metadata_map
    tokenizer = load_tokenizer(find_tokenizer_dir(args.model, metadata, args.tokenizer))
    encode = tokenizer.encode_chat if args.chat else tokenizer.encode
    prompts = [encode(text) for text in args.prompt]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = _source_config(metadata).get("pad_token_id")
    result = generate(
        info,
        prompts,
        args.max_new_tokens,
        select=sampling if sampling is not None else argmax_selector,
        stop_tokens=tokenizer.stop_token_ids(),
        pad_token_id=int(pad) if isinstance(pad, int) else 0,
    )
    for index, (text, tokens) in enumerate(zip(args.prompt, result.tokens), start=1):
        print(f"[{index}] {text}")
        print(tokenizer.decode(tokens))
        print()
    total = result.total_seconds
    rate = result.new_tokens / total if total > 0 else float("nan")
    print(
        f"{info.describe()} | {len(prompts)} prompt(s), {result.new_tokens} new tokens in {total:.2f} s "
        f"({rate:.1f} tokens/s; prefill {result.prefill_seconds * 1000:.0f} ms, "
        f"decode {result.decode_tokens_per_second:.1f} tokens/s) | {_describe_sampling(sampling)}"
    )
    return 0


def _describe_sampling(sampling: Sampling | None) -> str:
    if sampling is None:
        return "greedy"
    return (
        f"sampling: temperature {sampling.temperature:g}, top-k {sampling.top_k or 'all'}, "
        f"top-p {sampling.top_p:g}, seed {sampling.seed if sampling.seed is not None else 'none'}"
    )


def _source_config(metadata: dict) -> dict:
    try:
        config = json.loads(metadata.get(contract.SOURCE_CONFIG, "{}"))
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}
