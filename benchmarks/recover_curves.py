"""Recovery per wall-clock and per CPU minute: full-vocabulary KD, local reconstruction then KD,
top-k KD, from the same pruned start with the same budget (numbers for reports, never a timed test).

    python benchmarks/recover_curves.py PRUNE_DIR --workdir DIR [--budget 10m] [--teacher smollm2-135m]
        [--train-samples 512] [--local-fraction 0.3] [--top-k 64] [--eval-interval 90s]
        [--eval-samples 8] [--threads N] [--methods local,full,topk] [--shared-cache] [--lr LR] [--warmup W]
        [--precision auto|float32|bfloat16]

PRUNE_DIR is a `pangu-light prune` output (its pruned.onnx is the start of every run, its
original.onnx the teacher's graph). The runs go one after another, each a CLI subprocess with the
same data (the wiki calibration split, --train-samples windows of 256 tokens, seed 0), the same
held-out windows (--eval-samples of LAMBADA's and of Wikipedia's evaluation split, each reported
apart; evaluations every --eval-interval of training time, counted in the budget as distill
counts them) and ``--time-budget``:

    full     pangu-light distill  (KL over the whole vocabulary, the exact reference)
    local    pangu-light recover  --local-fraction F (local reconstruction, then full KD)
    topk     pangu-light distill  --kd topk --top-k K

Each run builds its own teacher cache (unless --shared-cache), so its process CPU seconds hold
its whole cost. Every metrics entry carries three clocks: ``elapsed_s`` (training wall time, what
the budget counts; set-up excluded), ``wall_s`` and ``cpu_s`` (the process's wall and CPU seconds
since it started: set-up included). DIR/recover_curves.png plots held-out perplexity on both
sources against training wall minutes and against process CPU minutes, with the teacher's
perplexity on the same windows; DIR/recover_curves.json holds every curve, each run's set-up
stages, tokens/s, the matmul precision the run resolved (distill picks float32 on a CPU without
bfloat16 instructions; the runs are --quiet, so it is read from each summary's fingerprint), the
machine and its load average at each run's start and end. ``--precision auto`` (the default)
leaves the choice to distill; float32 / bfloat16 force it for every run (--no-bf16 / --bf16), so
that curves from machines of different kinds compare. At the end
every distilled graph, the pruned start and the teacher are evaluated under ONNX Runtime
(float32) on the same windows. A run that fails its re-export check (it then writes no summary or
graph) keeps its curve and is reported as failing it; the table gives each run's max |diff|.
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

SOURCES = ("lambada", "wiki")
PRECISION_FLAGS = {"auto": [], "float32": ["--no-bf16"], "bfloat16": ["--bf16"]}


def _cli() -> str:
    return str(Path(sys.executable).with_name("pangu-light"))


def _run(name: str, command: list[str], out: Path) -> dict:
    if (out / "summary.json").is_file():
        note(f"{name}: {out} exists, reusing it")
        return {"wall_s": None, "load_start": None, "load_end": None, "returncode": 0}
    note(" ".join(command))
    load_start, start = os.getloadavg(), time.perf_counter()
    # A run whose re-export check fails exits 2 after writing its metrics: its curve is still read.
    code = subprocess.run(command, stdout=sys.stderr).returncode
    seconds = time.perf_counter() - start
    note(f"{name}: {seconds:.0f} s wall (set-up, training, export), exit status {code}")
    if not (out / "metrics.jsonl").is_file():
        raise SystemExit(f"{name} wrote no metrics (exit status {code}); see its output above")
    return {"wall_s": seconds, "load_start": load_start, "load_end": os.getloadavg(), "returncode": code}


def matmul_precision(summary: dict) -> str:
    """The matmul precision a run trained and evaluated in, from its summary's fingerprint
    ("unknown" without one: a run that failed its re-export check writes no summary)."""
    bf16 = summary.get("fingerprint", {}).get("bf16")
    return "unknown" if bf16 is None else ("bfloat16" if bf16 else "float32")


def _curve(history: list[dict], source: str) -> list[tuple[float, float, float, float]]:
    """(training wall minutes, process wall minutes, process CPU minutes, perplexity) per evaluation."""
    key = f"eval_perplexity_{source}"
    return [(round(h["elapsed_s"] / 60, 3), round(h.get("wall_s", float("nan")) / 60, 3),
             round(h.get("cpu_s", float("nan")) / 60, 3), round(h[key], 3)) for h in history if key in h]


def _plot(record: dict, teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=80, sharey="row")
    for row, source in enumerate(SOURCES):
        for col, (index, label) in enumerate(((0, "training wall minutes (set-up excluded)"),
                                              (2, "process CPU minutes (set-up included)"))):
            ax = axes[row][col]
            for name, run in record.items():
                curve = run["curves"][source]
                ax.plot([p[index] for p in curve], [p[3] for p in curve], marker="o", markersize=3, label=name)
            ax.axhline(teacher[source], color="black", linestyle="--", linewidth=1, label="teacher")
            ax.axhline(1.2 * teacher[source], color="grey", linestyle=":", linewidth=1, label="1.2x teacher")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{source} held-out perplexity")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prune_dir", type=Path)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--local-fraction", type=float, default=0.3)
    parser.add_argument("--local-samples", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--eval-interval", default="90s")
    parser.add_argument("--eval-samples", type=int, default=8, help="held-out windows of each source")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--methods", default="full,local,topk")
    parser.add_argument("--shared-cache", action="store_true", help="full and local share one teacher cache")
    parser.add_argument("--lr", help="distill's peak learning rate (default: distill's)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="matmul precision of every run (default: distill's own choice per run)")
    parser.add_argument("--warmup", help="distill's --warmup, steps or a fraction of the run (default: distill's)")
    args = parser.parse_args()

    from pangu_light.calib.evaluate import perplexity
    from pangu_light.calib.text import graph_tokenizer, sequences_for
    from pangu_light.passes.infra.graph_io import load_model_metadata

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pruned, original = args.prune_dir / "pruned.onnx", args.prune_dir / "original.onnx"
    common = ["--teacher", args.teacher, "--data", "wiki", "--train-samples", str(args.train_samples),
              "--eval-data", ",".join(SOURCES), "--eval-samples", str(args.eval_samples),
              "--time-budget", args.budget, "--eval-every", "100000", "--eval-interval", args.eval_interval,
              "--save-every", "100000", "--plot-axis", "seconds", "--quiet",
              *(["--threads", str(args.threads)] if args.threads else []),
              *(["--lr", args.lr] if args.lr else []), *(["--warmup", args.warmup] if args.warmup else []),
              *PRECISION_FLAGS[args.precision]]
    cache = {name: work / ("cache-full" if args.shared_cache and name == "local" else f"cache-{name}")
             for name in ("full", "local", "topk")}
    commands = {
        "full": [_cli(), "distill", str(pruned), *common],
        "local": [_cli(), "recover", str(args.prune_dir), "--local-fraction", str(args.local_fraction),
                  "--local-samples", str(args.local_samples), *common],
        "topk": [_cli(), "distill", str(pruned), "--kd", "topk", "--top-k", str(args.top_k), *common],
    }
    methods = args.methods.split(",")
    runs = {}
    for name in methods:
        out = work / f"run-{name}"
        runs[name] = _run(name, [*commands[name], "--teacher-cache", str(cache[name]), "-o", str(out)], out)

    # The same windows as the runs evaluated on (same source, count, seed and length).
    encode, eos = graph_tokenizer(original, load_model_metadata(original), None)
    eval_sets = {data: sequences_for(data, encode, eos, samples=args.eval_samples, seq_len=256, seed=0,
                                     split="eval") for data in SOURCES}
    graphs = {"teacher": original, "pruned": pruned,
              **{name: work / f"run-{name}" / "distilled.onnx" for name in methods
                 if (work / f"run-{name}" / "distilled.onnx").is_file()}}
    ppl = {data: {} for data in eval_sets}
    for label, path in graphs.items():
        for data, windows in eval_sets.items():
            ppl[data][label] = perplexity(path, windows, batch_size=4).perplexity
            note(f"{label} on {data}: {ppl[data][label]:.2f}")
    record = {}
    for name in methods:
        out = work / f"run-{name}"
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        # No summary: the run failed at its end (the re-export check); its training numbers stand.
        summary_path = out / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
        last = history[-1]
        record[name] = {
            **runs[name], "kd_steps": summary.get("steps", sum("loss" in h for h in history)),
            "kd_train_s": summary.get("train_s", last.get("elapsed_s")), "setup_s": summary.get("setup_s"),
            "local_s": summary.get("recover", {}).get("local_s", 0.0), "warmup": summary.get("warmup"),
            "reexport_max_abs_diff": summary.get("export_max_abs_diff"),
            "reexport_check": "passed" if summary.get("distilled_graph") else "failed (no summary or graph)",
            "matmuls": matmul_precision(summary),
            "stages": summary.get("stages"), "median_kd_tokens_per_s": statistics.median(speeds) if speeds else None,
            "tokens": last["tokens"], "final_cpu_s": last.get("cpu_s"), "final_wall_s": last.get("wall_s"),
            "curves": {source: _curve(history, source) for source in SOURCES},
        }
    teacher = {data: ppl[data]["teacher"] for data in SOURCES}
    _plot(record, teacher, work / "recover_curves.png")
    result = {"budget": args.budget, "train_samples": args.train_samples, "eval_samples": args.eval_samples,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": args.threads, "perplexity_ort_float32": ppl, "runs": record}
    (work / "recover_curves.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"budget {args.budget} per run; {os.cpu_count()} CPUs")
    for data, values in ppl.items():
        print(f"perplexity on {data} (eval split, {args.eval_samples} x 256 tokens; ONNX Runtime, float32):")
        print(format_table([(f"  {label}", f"{value:.2f}", f"({value / values['teacher']:.2f}x teacher)")
                            for label, value in values.items()]))
    table = [("run", "matmuls", "load start/end", "set-up s", "local s", "KD s", "KD steps", "tokens",
              "KD tok/s (median)", "CPU min", "wall min", "re-export |diff|")]
    for name, r in record.items():
        load = "-" if r["load_start"] is None else f"{r['load_start'][0]:.1f}/{r['load_end'][0]:.1f}"
        diff = r["reexport_max_abs_diff"]
        table.append((name, r["matmuls"], load, f"{r['setup_s'] or 0:.0f}", f"{r['local_s']:.0f}",
                      f"{r['kd_train_s']:.0f}", str(r["kd_steps"]), f"{r['tokens']:,}",
                      f"{r['median_kd_tokens_per_s'] or 0:.0f}",
                      f"{(r['final_cpu_s'] or 0) / 60:.1f}", f"{(r['final_wall_s'] or 0) / 60:.1f}",
                      "failed" if diff is None else f"{diff:.2e} passed"))
    print(format_table(table))
    for name, r in record.items():
        for source in SOURCES:
            print(f"{name} {source} (train min, wall min, CPU min, ppl): {r['curves'][source]}")
        print(f"{name} set-up stages: {r['stages']}")
    print(f"plot: {work / 'recover_curves.png'}")


if __name__ == "__main__":
    main()
