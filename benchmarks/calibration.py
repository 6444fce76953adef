"""Calibration benchmarks: cost of the statistic taps, and how stable the rankings are.

    .venv/bin/python benchmarks/calibration.py GRAPH.onnx [--samples 16,64,256] [--seq-len 256]

1. Throughput: the tapped graph (``calib.taps``) and the plain graph (logits) over the same
   batches, alternately in one process, after a warm-up; medians over batches. The tapped
   graph drops the lm_head, so "overhead" can be negative; the accumulation in numpy is timed
   separately (it is part of calibration's cost).
2. Stability: calibrate on the first N of one seeded draw of sequences for each N, and compare
   the rankings (Spearman correlation) of S_channel, S_head (all layers), S_ffn (all layers),
   Block Influence, plus the overlap of the kept sets a typical plan would pick (hidden 448 of
   576, 6 layers to drop), against the largest N.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort

from pangu_light.calib.stats import StatsAccumulator, batched, calibrate
from pangu_light.calib.taps import add_statistic_taps
from pangu_light.calib.text import graph_tokenizer, sequences_for
from pangu_light.core.files import write_json
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model_metadata


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def throughput(graph: Path, sequences: np.ndarray, batch_size: int, repeats: int) -> dict:
    model = ir.load(graph)
    model_map = ModelMap.from_model(model)
    layout = add_statistic_taps(model, model_map)
    common_passes.RemoveUnusedNodesPass()(model)
    with tempfile.TemporaryDirectory() as tmp:
        tapped_path = Path(tmp) / "tapped.onnx"
        ir.save(model, tapped_path, external_data="tapped.onnx.data")
        del model
        options = ort.SessionOptions()
        plain = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        tapped = ort.InferenceSession(str(tapped_path), options, providers=["CPUExecutionProvider"])
        names = layout.outputs()
        batches = list(batched(sequences, batch_size))
        accumulator = StatsAccumulator(layout)
        times = {"plain": [], "tapped": [], "accumulate": []}
        for ids, mask in batches[:1]:  # warm-up
            plain.run(["logits"], {"input_ids": ids, "attention_mask": mask})
            tapped.run(names, {"input_ids": ids, "attention_mask": mask})
        for _ in range(repeats):
            for ids, mask in batches:
                feeds = {"input_ids": ids, "attention_mask": mask}
                start = time.perf_counter()
                plain.run(["logits"], feeds)
                times["plain"].append(time.perf_counter() - start)
                start = time.perf_counter()
                outputs = dict(zip(names, tapped.run(names, feeds)))
                times["tapped"].append(time.perf_counter() - start)
                start = time.perf_counter()
                accumulator.add(outputs, mask)
                times["accumulate"].append(time.perf_counter() - start)
    tokens = batch_size * sequences.shape[1]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": [batch_size, int(sequences.shape[1])],
        "batches_timed": len(times["plain"]),
        "plain_tokens_per_s": tokens / med["plain"],
        "tapped_tokens_per_s": tokens / med["tapped"],
        "calibration_tokens_per_s": tokens / (med["tapped"] + med["accumulate"]),
        "overhead_vs_plain": (med["tapped"] + med["accumulate"]) / med["plain"] - 1,
        "median_seconds": med,
    }


def stability(graph: Path, sequences: np.ndarray, sizes: list[int], batch_size: int) -> dict:
    results = {}
    for n in sizes:
        start = time.perf_counter()
        results[n] = calibrate(graph, batched(sequences[:n], batch_size))
        print(f"  calibrated {n} samples in {time.perf_counter() - start:.1f} s", flush=True)
    reference = results[max(sizes)]
    top_hidden = lambda s: set(np.argsort(-s.channel)[:448].tolist())  # noqa: E731
    low_bi = lambda s: set(np.argsort(s.block_influence)[:6].tolist())  # noqa: E731
    report = {}
    for n in sizes:
        s = results[n]
        report[n] = {
            "spearman_channel": spearman(s.channel, reference.channel),
            "spearman_heads": spearman(np.concatenate(s.heads), np.concatenate(reference.heads)),
            "spearman_ffn": spearman(np.concatenate(s.ffn), np.concatenate(reference.ffn)),
            "spearman_block_influence": spearman(s.block_influence, reference.block_influence),
            "kept_hidden_overlap_448": len(top_hidden(s) & top_hidden(reference)) / 448,
            "dropped_layers": sorted(int(i) for i in low_bi(s)),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path)
    parser.add_argument("--samples", default="16,64,256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--throughput-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.samples.split(","))
    encode, eos_id = graph_tokenizer(args.graph, load_model_metadata(args.graph), None)
    sequences = sequences_for("wiki", encode, eos_id, samples=max(sizes), seq_len=args.seq_len, seed=0, split="calib")
    rng_order = np.random.default_rng(1).permutation(len(sequences))  # first-N subsets of one random draw
    sequences = sequences[rng_order]
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {__import__('os').cpu_count()} cores, onnxruntime {ort.__version__}")
    result = {"throughput": throughput(args.graph, sequences[: args.throughput_samples], args.batch_size, args.repeats)}
    print(json.dumps(result["throughput"], indent=2), flush=True)
    result["stability"] = stability(args.graph, sequences, sizes, args.batch_size)
    print(json.dumps(result["stability"], indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
