"""Export a Hugging Face decoder-only model to a clean ONNX graph that passes can rewrite.

    pangu-light export smollm2-135m -o model.onnx              # no-cache graph
    pangu-light export ./my-hf-dir -o decode.onnx --kv-cache   # decode graph with a KV cache

MODEL is an alias (smollm2-135m, the default; gemma3-270m), a local Hugging Face model
directory (config.json + weights), or a hub id where a network exists. The model is loaded
in float32; supported families: Llama, Qwen2, Qwen3, Mistral, Gemma2, Gemma3 (text), GLM4.

Graph I/O (names as ONNX Runtime GenAI and optimum use them):

    no-cache  input_ids[b, s], attention_mask[b, s] -> logits[b, s, V]
    decode    + past_key_values.{i}.key/value in, present.{i}.key/value out

Weights keep their checkpoint names. The model directory (for the tokenizer) and MODEL are
written into the graph's metadata (pangu_light.tokenizer, pangu_light.source_model). The
output is written atomically: a failed export leaves no file behind. The model map (layers,
heads, FFN widths, norms) is printed at the end.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.loading import DEFAULT_MODEL, resolve_model
from pangu_light.tools.io import refuse_overwrite_input, save_model_atomic

__all__ = ["HELP", "add_arguments", "run", "export_to_file"]

HELP = "export a Hugging Face model to a clean ONNX graph (no-cache or decode)"

TOKENIZER_KEY = "pangu_light.tokenizer"
SOURCE_MODEL_KEY = "pangu_light.source_model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"alias, local HF model directory or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("-o", "--output", type=Path, help="output .onnx path")
    parser.add_argument(
        "--kv-cache",
        action="store_true",
        help="export the decode graph (past_key_values.{i}.key/value in, present.{i}.key/value out)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress notes on stderr")


def _check_output(output: Path | None, model_dir: Path | None = None) -> None:
    if output is None:
        raise PanguLightError(
            "export needs -o OUTPUT, e.g. `pangu-light export smollm2-135m -o model.onnx`"
        )
    if output.is_dir():
        raise PanguLightError(f"output {output} is a directory; pass a file path such as {output / 'model.onnx'}")
    if model_dir is not None and model_dir.is_dir():
        refuse_overwrite_input(output, *sorted(model_dir.iterdir()))


def export_to_file(spec: str, output: Path, *, kv_cache: bool, progress=None):
    """Resolve, load, check, export and save ``spec``; return ``(ir_model, model_map, seconds)``.

    ``progress(message)`` is called before each slow step.
    """
    from pangu_light.passes.analysis.model_map import ModelMap

    note = progress or (lambda message: None)
    start = time.perf_counter()
    _check_output(output)
    model_dir = resolve_model(spec)
    _check_output(output, model_dir)

    # The architecture is checked from config.json before any weights are read.
    from transformers import AutoConfig

    from pangu_light.frontend.export import ExportOptions, check_supported, export_model
    from pangu_light.frontend.loading import load_hf_model

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as error:  # transformers raises ValueError/KeyError/OSError variously
        raise PanguLightError(
            f"cannot read the config of {model_dir} ({type(error).__name__}: {error}); "
            "pass a Hugging Face model directory with a valid config.json"
        ) from None
    check_supported(config)

    note(f"loading {spec} from {model_dir} (float32)")
    try:
        hf_model = load_hf_model(model_dir)
    except PanguLightError:
        raise
    except Exception as error:  # missing or truncated weights, unknown classes, ...
        raise PanguLightError(
            f"cannot load the model in {model_dir} ({type(error).__name__}: {error}); "
            "check that its weight files are complete"
        ) from None
    check_supported(hf_model.config)
    n_params = sum(p.numel() for p in hf_model.parameters())
    kind = "decode (KV cache)" if kv_cache else "no-cache"
    note(f"exporting the {kind} graph of {n_params / 1e6:.1f}M parameters and cleaning it "
         "(torch.onnx dynamo export, constant folding)")
    ir_model = export_model(hf_model, ExportOptions(kv_cache=kv_cache))
    del hf_model
    ir_model.metadata_props[TOKENIZER_KEY] = str(model_dir)
    ir_model.metadata_props[SOURCE_MODEL_KEY] = str(spec)

    note("deriving the model map")
    try:
        model_map = ModelMap.from_model(ir_model)
    except PanguLightError as error:
        raise PanguLightError(
            f"the exported graph is not one the passes can read ({error}); this is a bug in "
            "pangu-light's exporter, please report it with the model's config.json"
        ) from None

    note(f"saving {output}")
    save_model_atomic(ir_model, output)
    return ir_model, model_map, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"... {message} [{time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)

    ir_model, model_map, seconds = export_to_file(
        args.model, args.output, kv_cache=args.kv_cache, progress=progress
    )
    size = sum(p.stat().st_size for p in _written_files(args.output))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(model_map.summary())
    print(
        f"wrote {args.output} ({size / 1e6:.1f} MB, {len(ir_model.graph)} nodes, "
        f"{len(ir_model.graph.initializers)} initializers) in {seconds:.1f} s; "
        f"peak memory {peak_mb:.0f} MB"
    )
    return 0


def _written_files(output: Path) -> list[Path]:
    data = output.with_name(output.name + ".data")
    return [output] + ([data] if data.exists() else [])
