"""Export a Hugging Face decoder-only model to a clean ONNX graph that passes can rewrite.

    pangu-light export smollm2-135m -o model.onnx              # no-cache graph
    pangu-light export ./my-hf-dir -o decode.onnx --kv-cache   # decode graph with a KV cache
    pangu-light export smollm2-135m -o model.onnx --decode-output decode.onnx   # both, one run

MODEL is an alias (smollm2-135m, the default; gemma3-270m), a local Hugging Face model
directory (config.json + weights), or a hub id where a network exists. The graph is float32
unless --dtype float16|bfloat16 asks for a half graph (float32 stays the default: ONNX
Runtime's CPU provider has few bfloat16 kernels, and statistics and refits are float32 work
anyway; a checkpoint's own dtype is often bfloat16). Supported families: Llama, Qwen2, Qwen3,
Mistral, Gemma2, Gemma3 (text), GLM4.

Graph I/O (names as ONNX Runtime GenAI and optimum use them):

    no-cache  input_ids[b, s], attention_mask[b, s] -> logits[b, s, V]
    decode    + past_key_values.{i}.key/value in, present.{i}.key/value out

Weights keep their checkpoint names. The model directory (for the tokenizer) and MODEL are
written into the graph's metadata (pangu_light.tokenizer, pangu_light.source_model). The
output is written atomically: a failed export leaves no file behind. Graphs over 64 MiB of
weights keep them in a side file, OUTPUT.<random>.data (keep the two together).

When the checkpoint is safetensors, the structure is traced on empty weights and the weights
are copied from the checkpoint file to file (never loaded); the traced structure is cached per
config under the cache directory (structures/), so exporting the same architecture again
skips the trace (--retrace to trace anyway). The model map (layers,
heads, FFN widths, norms) is printed at the end.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.loading import DEFAULT_MODEL
from pangu_light.passes.infra.graph_io import data_files

__all__ = ["HELP", "add_arguments", "run"]

HELP = "export a Hugging Face model to a clean ONNX graph (no-cache or decode)"


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
    parser.add_argument(
        "--decode-output",
        type=Path,
        metavar="PATH",
        help="also write the decode graph to PATH in the same run (with -o the no-cache graph)",
    )
    parser.add_argument(
        "--retrace",
        action="store_true",
        help="trace again even if a structure traced before for this config is cached",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="the graph's weights, activations, KV cache and logits (default float32; norms, softmax "
        "and rotary angles compute in float32 inside a half graph, as in torch). ONNX Runtime's CPU "
        "provider lacks bfloat16 kernels: calibrate and eval run a float32 copy of a bfloat16 graph",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress notes on stderr")


def run(args: argparse.Namespace) -> int:
    from pangu_light.frontend.export_stage import export_graphs

    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"... {message} [{time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)

    outputs = {args.kv_cache: args.output}
    if args.decode_output is not None:
        if args.kv_cache:
            raise PanguLightError("--decode-output names the decode graph: drop --kv-cache (-o is the no-cache one)")
        outputs[True] = args.decode_output
    results = export_graphs(args.model, outputs, progress=progress, reuse_structure=not args.retrace,
                            dtype=args.dtype)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    for kv_cache, (ir_model, model_map) in results.items():
        output = outputs[kv_cache]
        size = sum(p.stat().st_size for p in _written_files(output))
        print(model_map.summary())
        print(
            f"wrote {output} ({size / 1e6:.1f} MB with its weights file, {len(ir_model.graph)} nodes, "
            f"{len(ir_model.graph.initializers)} initializers)"
        )
    print(f"exported in {seconds:.1f} s; peak memory {peak_mb:.0f} MB")
    return 0


def _written_files(output: Path) -> list[Path]:
    return [output, *data_files(output)]
