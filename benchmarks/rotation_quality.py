"""Hidden channels by rotation (issue 14, item 3) on SmolLM2-135M: held-out perplexity, one run.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/rotation_quality.py \\
        [--workdir /tmp/rotation-quality] [--graph orig.onnx] [--calib-samples 64] [--eval-samples 32]

1. ``pangu-light export smollm2-135m`` (no-cache graph), or ``--graph``.
2. On the wiki calib split (64 x 256 tokens, the same batches): the statistics (``calib.stats``),
   the o_proj/down_proj input Grams (``calib.gram``) and the rotation (``calib.rotation``: PCA
   of every hidden norm's unit-normalised input, per-norm kept energies).
3. Three shapes, each planned twice from the same statistics, ``--hidden-method select``
   (S_channel channels + SLNP, today) and ``rotate`` (leading components + RMS correction):
   the ``--params 0.8`` default, the 0.62 shape (hidden 448, 2 of 3 heads per group, FFN 1152),
   and hidden 576 -> 448 alone. The first two are refit (``refit_for_plan``, no intercept: the
   ``prune`` default; with rotate, in the rotated basis); hidden-only has nothing to refit.
4. Perplexity of every graph and the unpruned one on the same eval-split windows of LAMBADA and
   wiki (``calib.evaluate.perplexity``), one-shot (no recovery training).

Measured (2026-12-03, 2 shared cores, load average 14 -> 7, ``--eval-samples 8``; perplexity and
x unpruned; unpruned LAMBADA 56.57, wiki 27.27)::

    shape       row            params   lambada x unpr.      wiki x unpr.
    params-0.8  select+refit    0.800    190.29    3.36     80.16    2.94
    params-0.8  rotate+refit    0.800    160.11    2.83     65.39    2.40
    shape-0.62  select+refit    0.624    738.62   13.06    423.38   15.53
    shape-0.62  rotate+refit    0.624    446.10    7.89    179.34    6.58
    hidden-448  select          0.778    315.29    5.57    159.26    5.84
    hidden-448  rotate          0.778    218.53    3.86     94.30    3.46
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import onnx_ir as ir
from common import add_graph_arguments, note, start
from refit_quality import ALIAS, held_out_perplexities, statistics, tokenizer

from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.refit_plan import refit_and_set
from pangu_light.calib.rotation import collect_rotation
from pangu_light.calib.stats import batched
from pangu_light.calib.text import sequences_for
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.rewrites.rotate_hidden import load_rotation, save_rotation

SHAPES = {  # name -> (targets, refit)
    "params-0.8": (Targets(params=0.8), True),
    "shape-0.62": (Targets(hidden=448, heads_per_group=2, ffn=1152), True),
    "hidden-448": (Targets(hidden=448), False),
}


def rotation_file(graph: Path, workdir: Path, samples: int, seq_len: int, threads: int) -> Path:
    path = workdir / "rotation.npz"
    if not path.exists():
        encode, bos = tokenizer(graph)
        sequences = sequences_for("wiki", encode, bos, samples=samples, seq_len=seq_len, seed=0, split="calib")
        note(f"rotation of {graph.name}: {sequences.shape} tokens")
        save_rotation(path, collect_rotation(graph, batched(sequences, 4), threads=threads,
                                             meta={"data": "wiki", "samples": samples, "seq_len": seq_len}))
    return path


def build(original: Path, plan, grams, refit: bool, rotation, out: Path) -> None:
    model = ir.load(original)
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    if refit:
        refits = refit_and_set(ir.load(original), model, grams, plan, rotation=rotation)
        if refits.skipped:
            note(f"  left as they are: {refits.skipped}")
    ir.save(model, out, external_data=out.name + ".data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_arguments(parser, ALIAS, workdir="/tmp/rotation-quality", eval_samples=32)
    parser.add_argument("--calib-samples", type=int, default=64)
    args = parser.parse_args()
    original, started, load_start = start(args, ALIAS)
    stats, grams = statistics(original, args.workdir, args.calib_samples, args.seq_len, args.threads)
    rotation_path = rotation_file(original, args.workdir, args.calib_samples, args.seq_len, args.threads)
    rotation = load_rotation(rotation_path)
    model_map = ModelMap.from_model(ir.load(original))

    evaluate = held_out_perplexities(original, args.eval_samples, args.seq_len, args.threads)

    base_parameters = GraphStats.from_model(ir.load(original)).total_parameters
    results = {("unpruned", "-"): evaluate(original)}
    params = {("unpruned", "-"): 1.0}
    for shape, (targets, refit) in SHAPES.items():
        for method in ("select", "rotate"):
            targets.hidden_method = method
            plan = make_plan(model_map, stats, targets, rotation=rotation, rotation_file=str(rotation_path.resolve()))
            row = f"{method}{'+refit' if refit else ''}"
            out = args.workdir / f"{shape}-{row}.onnx"
            note(f"compile {out.name}: {plan.pipeline()}")
            build(original, plan, grams, refit, rotation, out)
            params[(shape, row)] = GraphStats.from_model(ir.load(out)).total_parameters / base_parameters
            results[(shape, row)] = evaluate(out)
            out.unlink()
            out.with_name(out.name + ".data").unlink()

    print(f"SmolLM2-135M one-shot; calibration wiki {args.calib_samples} x {args.seq_len} (calib split); "
          f"eval {args.eval_samples} x {args.seq_len} per set (eval split); load average at start {load_start}, "
          f"at end {os.getloadavg()}")
    print(f"{'shape':<11} {'row':<14} {'params':>6} {'lambada':>9} {'x unpr.':>7} {'wiki':>9} {'x unpr.':>7}")
    base = results[("unpruned", "-")]
    for (shape, row), ppl in results.items():
        print(f"{shape:<11} {row:<14} {params[(shape, row)]:>6.3f} {ppl['lambada']:>9.2f} "
              f"{ppl['lambada'] / base['lambada']:>7.2f} {ppl['wiki']:>9.2f} {ppl['wiki'] / base['wiki']:>7.2f}")
    table = [{"shape": s, "row": r, "parameter_ratio": params[(s, r)], **v} for (s, r), v in results.items()]
    (args.workdir / "rotation_quality.json").write_text(json.dumps(table, indent=2) + "\n")
    note(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
