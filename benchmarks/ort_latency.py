"""ONNX Runtime latency of graphs measured side by side, next to their FLOP ratio.

    python benchmarks/ort_latency.py original.onnx pruned.onnx [--seq 128] [--batch 1]
        [--repeats 30] [--threads 2]

Graphs are loaded into sessions once and then run alternately (A, B, A, B, ...) so that
drifts of the machine hit both alike; warm-up runs are excluded; the table shows medians and
the interquartile range, and each graph's latency and FLOPs per token relative to the first.
No-cache graphs only (one forward over ``seq`` tokens); decode workloads belong to
``pangu-light bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import onnxruntime as ort

from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.infra.graph_io import load_model
from pangu_light.reports.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    sessions, flops, vocabs = [], [], []
    for path in args.graphs:
        stats = GraphStats.from_model(load_model(path), context=args.seq)
        flops.append(stats.flops_per_token)
        vocabs.append(stats.vocab_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    vocab_safe = min(1000, *vocabs)  # ids every graph can embed (tiny test models have 160)
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(3, vocab_safe, (args.batch, args.seq), dtype=np.int64),
        "attention_mask": np.ones((args.batch, args.seq), dtype=np.int64),
    }
    times: list[list[float]] = [[] for _ in sessions]
    for round_index in range(args.warmup + args.repeats):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(["logits"], feeds)
            if round_index >= args.warmup:
                times[i].append(time.perf_counter() - start)

    rows = []
    base_median, base_flops = float(np.median(times[0])), flops[0]
    for path, samples, flop in zip(args.graphs, times, flops):
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        rows.append({
            "graph": path, "median_ms": median * 1e3, "iqr_ms": [q1 * 1e3, q3 * 1e3],
            "latency_ratio": median / base_median, "flops_per_token": flop, "flop_ratio": flop / base_flops,
            "speedup": base_median / median, "ideal_speedup_from_flops": base_flops / flop,
        })
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} cores, ORT {ort.__version__}, {args.threads} threads"
    if args.json:
        print(
            json.dumps(
                {"machine": machine, "seq": args.seq, "batch": args.batch, "repeats": args.repeats, "rows": rows},
                indent=2,
            )
        )
        return
    print(f"machine: {machine}; batch {args.batch}, seq {args.seq}, {args.repeats} alternating repeats (medians)")
    table = [("graph", "median ms", "IQR ms", "latency", "FLOPs", "speedup", "ideal")]
    for row in rows:
        iqr = f"{row['iqr_ms'][0]:.1f}-{row['iqr_ms'][1]:.1f}"
        table.append(
            (
                os.path.basename(row["graph"]),
                f"{row['median_ms']:.1f}",
                iqr,
                f"{row['latency_ratio']:.3f}",
                f"{row['flop_ratio']:.3f}",
                f"{row['speedup']:.2f}x",
                f"{row['ideal_speedup_from_flops']:.2f}x",
            )
        )
    print(format_table(table))


if __name__ == "__main__":
    main()
