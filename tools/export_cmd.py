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

from pangu_light.frontend.loading import DEFAULT_MODEL

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
    parser.add_argument("--quiet", action="store_true", help="no progress notes on stderr")


def run(args: argparse.Namespace) -> int:
    from pangu_light.frontend.export import export_to_file

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
