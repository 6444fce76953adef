"""Compute the importance statistics of a graph on calibration text (paper section 3).

    pangu-light calibrate model.onnx --data wiki --samples 64 --seq-len 256 -o stats.npz

Taps are added to a temporary copy of the graph (masked reductions after each RMSNorm, the
attention output before o_proj, the FFN activation, each layer's input and output, each
post-norm's 1/rms) and ONNX Runtime runs it over the calibration split of the text, batch by
batch, accumulating in float64; activations are never kept. The .npz holds S_channel (eq. 1),
S_head and S_ffn per layer (eqs. 2-3), Block Influence per layer (eq. 4), post-norm s_inv
(eq. 8), gamma statistics per norm, and the settings used (key `meta`).

--aggregation paper sums over every token, as the paper writes eqs. 1-3; minitron takes the
mean over each sequence, then the L2 norm over sequences (Minitron's choice).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra.graph_io import refuse_overwrite_input
from pangu_light.tools.arguments import add_text_arguments

__all__ = ["HELP", "add_arguments", "run"]

HELP = "compute importance statistics of a graph on calibration text (-> stats.npz)"

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the .onnx graph to calibrate (no-cache or decode)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output statistics file (.npz)")
    add_text_arguments(parser, role="calib", samples=DEFAULT_SAMPLES, seq_len=DEFAULT_SEQ_LEN)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per ONNX Runtime call (default 4)")
    parser.add_argument(
        "--max-memory", metavar="SIZE",
        help="pick the batch size to fit SIZE (e.g. 4G, 512M): estimated from the graph's weights, a runtime "
        "overhead and the activations of one sequence (printed before the run starts); overrides --batch-size. "
        "The statistics are summed per batch in float64; another batch size changes them only by float32 rounding",
    )
    parser.add_argument(
        "--aggregation", choices=("paper", "minitron"), default="paper",
        help="paper: sum over all tokens (default); minitron: mean over each sequence, L2 over sequences",
    )
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu (default), cuda, cann, auto")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    refuse_overwrite_input(args.output, args.model)
    if args.output.suffix != ".npz":
        raise PanguLightError(f"the statistics file must end in .npz (got {args.output})")
    from pangu_light.calib.calibrate import calibrate_graph
    from pangu_light.calib.memory import parse_size

    max_memory = parse_size(args.max_memory) if args.max_memory is not None else None

    start = time.perf_counter()
    stats = calibrate_graph(
        args.model, data=args.data, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        batch_size=args.batch_size, aggregation=args.aggregation, provider=args.provider,
        threads=args.threads, tokenizer=args.tokenizer, quiet=args.quiet, max_memory=max_memory,
    )
    stats.save(args.output)
    seconds = time.perf_counter() - start
    order = stats.block_influence.argsort()
    rate = stats.tokens / seconds
    print(f"calibrated on {stats.tokens:,} tokens of {args.data!r} in {seconds:.1f} s ({rate:,.0f} tokens/s)")
    print(f"lowest Block Influence: layers {', '.join(str(int(i)) for i in order[:6])}")
    if stats.s_inv:
        low, high = min(stats.s_inv.values()), max(stats.s_inv.values())
        print(f"post-norm s_inv: {len(stats.s_inv)} norms, {low:.4g} .. {high:.4g}")
    print(f"wrote {args.output}")
    return 0
