"""Perplexity of one or more graphs on held-out text, same sequences for all.

    pangu-light eval model.onnx pruned.onnx --data lambada --samples 64 --seq-len 256

The evaluation split of the text is used (calibration never sees it; see calib/corpora.py).
Each graph is evaluated on the same token sequences, with the tokenizer of the first graph.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pangu_light.reports.table import format_table

__all__ = ["HELP", "add_arguments", "run"]

HELP = "perplexity of graphs on held-out text (the evaluation split)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", type=Path, nargs="+", help=".onnx graphs (no-cache or decode)")
    parser.add_argument("--data", default="lambada", help="wiki, lambada (default), or a .txt/.jsonl file")
    parser.add_argument("--samples", type=int, default=64, help="sequences (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing the sequences (default 0)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: recorded in the first graph)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per call (default 4)")
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime provider (default cpu)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pangu_light.calib.evaluate import evaluate_graphs

    results = evaluate_graphs(
        args.models, data=args.data, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        tokenizer=args.tokenizer, batch_size=args.batch_size, provider=args.provider,
        threads=args.threads, quiet=args.quiet,
    )
    if args.json:
        print(json.dumps({path: r.to_json() for path, r in results.items()}, indent=2))
        return 0
    rows = [("graph", "perplexity", "nll", "tokens")]
    rows += [(path, f"{r.perplexity:.3f}", f"{r.nll:.4f}", r.tokens) for path, r in results.items()]
    print(f"({args.data}, eval split)")
    print(format_table(rows))
    return 0
