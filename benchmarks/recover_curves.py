"""Recovery per wall-clock second: full-vocabulary KD, local reconstruction then KD, top-k KD, from
the same pruned start with the same budget (numbers for reports, never a timed test).

    python benchmarks/recover_curves.py PRUNE_DIR --workdir DIR [--budget 5m] [--teacher smollm2-135m]
        [--train-samples 512] [--local-fraction 0.3] [--top-k 64] [--eval-every 10] [--threads N]

PRUNE_DIR is a `pangu-light prune` output (its pruned.onnx is the start of every run, its
original.onnx the teacher's graph). The runs go one after another, each a CLI subprocess with the
same data (the wiki calibration split, --train-samples windows of 256 tokens, seed 0), the same
held-out windows (--run-eval-samples of the wiki evaluation split; the evaluations count in the
budget, as distill counts them) and ``--time-budget``:

    full     pangu-light distill  (KL over the whole vocabulary, the exact reference)
    local    pangu-light recover  --local-fraction F (local reconstruction, then full KD)
    topk     pangu-light distill  --kd topk --top-k K

Set-up (the teacher caches) is outside each budget, as the commands count it. At the end, every
distilled graph, the pruned start and the teacher are evaluated under ONNX Runtime (float32) on
LAMBADA's and Wikipedia's evaluation splits (the same windows for all); the runs' own held-out
wiki perplexity (bf16 matmuls) against elapsed minutes goes to DIR/recover_curves.png and the
whole record to DIR/recover_curves.json, with the machine, its load average before and after,
and each run's median tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import note

from pangu_light.reports.table import format_table


def _cli() -> str:
    return str(Path(sys.executable).with_name("pangu-light"))


def _run(name: str, command: list[str], out: Path) -> float:
    if (out / "summary.json").is_file():
        note(f"{name}: {out} exists, reusing it")
        return float("nan")
    note(" ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    seconds = time.perf_counter() - start
    note(f"{name}: {seconds:.0f} s wall (set-up, training, export)")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prune_dir", type=Path)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--local-fraction", type=float, default=0.3)
    parser.add_argument("--local-samples", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=16, help="windows of each final ORT evaluation")
    parser.add_argument("--run-eval-samples", type=int, default=8, help="held-out windows the runs evaluate on")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--methods", default="local,full,topk")
    args = parser.parse_args()

    from pangu_light.calib.evaluate import perplexity
    from pangu_light.calib.text import graph_tokenizer, sequences_for
    from pangu_light.passes.infra.graph_io import load_model_metadata
    from pangu_light.reports.loss_plot import plot_runs

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pruned, original = args.prune_dir / "pruned.onnx", args.prune_dir / "original.onnx"
    load_start = os.getloadavg()
    common = ["--teacher", args.teacher, "--data", "wiki", "--train-samples", str(args.train_samples),
              "--eval-samples", str(args.run_eval_samples), "--time-budget", args.budget, "--eval-every",
              str(args.eval_every), "--save-every", "1000", "--plot-axis", "seconds", "--quiet",
              *(["--threads", str(args.threads)] if args.threads else [])]
    commands = {
        "full": [_cli(), "distill", str(pruned), "--teacher-cache", str(work / "cache-full"), *common],
        "local": [_cli(), "recover", str(args.prune_dir), "--local-fraction", str(args.local_fraction),
                  "--local-samples", str(args.local_samples), "--teacher-cache", str(work / "cache-full"), *common],
        "topk": [_cli(), "distill", str(pruned), "--kd", "topk", "--top-k", str(args.top_k),
                 "--teacher-cache", str(work / "cache-topk"), *common],
    }
    methods = args.methods.split(",")
    walls = {}
    for name in methods:
        out = work / f"run-{name}"
        walls[name] = _run(name, [*commands[name], "-o", str(out)], out)
    load_end = os.getloadavg()

    encode, eos = graph_tokenizer(original, load_model_metadata(original), None)
    eval_sets = {data: sequences_for(data, encode, eos, samples=args.eval_samples, seq_len=256, seed=0,
                                     split="eval") for data in ("lambada", "wiki")}
    graphs = {"teacher": original, "pruned": pruned,
              **{name: work / f"run-{name}" / "distilled.onnx" for name in methods}}
    ppl = {data: {} for data in eval_sets}
    for label, path in graphs.items():
        for data, windows in eval_sets.items():
            ppl[data][label] = perplexity(path, windows, batch_size=4).perplexity
            note(f"{label} on {data}: {ppl[data][label]:.2f}")
    runs, record = {}, {}
    for name in methods:
        out = work / f"run-{name}"
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        runs[name] = history
        speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
        record[name] = {
            "kd_steps": summary["steps"], "kd_train_s": summary["train_s"], "setup_s": summary["setup_s"],
            "local_s": summary.get("recover", {}).get("local_s", 0.0), "wall_s": walls[name],
            "median_kd_tokens_per_s": statistics.median(speeds) if speeds else None,
            "tokens": history[-1]["tokens"],
            "curve": [(round(h["elapsed_s"] / 60, 3), round(h["eval_perplexity"], 3)) for h in history
                      if "eval_perplexity" in h],
        }
    plot_runs(runs, work / "recover_curves.png", x="seconds", reference=None)
    result = {"budget": args.budget, "train_samples": args.train_samples, "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "load_average_start": load_start,
              "load_average_end": load_end, "perplexity": ppl, "runs": record}
    (work / "recover_curves.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"budget {args.budget} per run; {os.cpu_count()} CPUs; load average {load_start[0]:.1f} -> {load_end[0]:.1f}")
    for data, values in ppl.items():
        print(f"perplexity on {data} (eval split, {args.eval_samples} x 256 tokens; ONNX Runtime, float32):")
        print(format_table([(f"  {label}", f"{value:.2f}", f"({value / values['teacher']:.2f}x teacher)")
                            for label, value in values.items()]))
    table = [("run", "local s", "KD s", "KD steps", "tokens", "KD tokens/s (median)", "set-up s")]
    for name, r in record.items():
        table.append((name, f"{r['local_s']:.0f}", f"{r['kd_train_s']:.0f}", str(r["kd_steps"]), f"{r['tokens']:,}",
                      f"{r['median_kd_tokens_per_s']:.0f}", f"{r['setup_s']:.0f}"))
    print(format_table(table))
    for name, r in record.items():
        print(f"{name}: held-out wiki perplexity (minutes, ppl): {r['curve']}")
    print(f"plot: {work / 'recover_curves.png'}")


if __name__ == "__main__":
    main()
