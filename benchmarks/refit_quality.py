"""Output refit after pruning (issue 14, item 1) on SmolLM2-135M: held-out perplexity, one run.

    nice -n 10 .venv/bin/python benchmarks/refit_quality.py [--workdir /tmp/refit-quality]
        [--graph orig.onnx] [--calib-samples 64] [--eval-samples 32] [--seq-len 256] [--threads 2]

1. ``pangu-light export smollm2-135m`` (no-cache graph), or ``--graph``.
2. Calibration on the wiki calib split (64 x 256 tokens): the statistics of ``calib.stats``
   and, on the same batches, the o_proj / down_proj input Grams of ``calib.gram``.
3. Two plans from those statistics: the ``--params 0.8`` default and the 0.62 shape (hidden
   448, 2 of 3 heads per group, FFN 1152), both with SLNP; each compiled by ``plan.pipeline()``.
4. Rows per plan: plain (today), + FLAP bias compensation, + refit without intercept, + refit
   with intercept (ridge 1e-5 x mean diag), and + FLAP's fluctuation metric ranking the heads
   (then refit with intercept); each refit is ``calib.refit_plan.refit_for_plan`` written to a
   projection file and applied by the ``set-projection`` pass.
5. Perplexity of every graph (and the unpruned one) on the same eval-split windows of LAMBADA
   and of wiki (``calib.evaluate.perplexity``). No recovery training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnx_ir as ir

from pangu_light.calib.evaluate import perplexity
from pangu_light.calib.gram import GramStats, collect_grams
from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.refit_plan import fluctuation_ranking, refit_and_set
from pangu_light.calib.stats import CalibrationStats, batched, calibrate
from pangu_light.calib.text import graph_tokenizer, sequences_for
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline

ALIAS = "smollm2-135m"
PLANS = {"params-0.8": Targets(params=0.8), "shape-0.62": Targets(hidden=448, heads_per_group=2, ffn=1152)}
ROWS = {  # name -> (refit method or None, intercept, heads ranked by FLAP's fluctuation metric)
    "plain": (None, False, False),
    "+bias-compensation": ("bias", False, False),
    "+refit": ("refit", False, False),
    "+refit+intercept": ("refit", True, False),
    "+flap-heads+refit+intercept": ("refit", True, True),
}


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tokenizer(graph: Path):
    """(encode, BOS id) of SmolLM2's own tokenizer (a graph from the test cache records none)."""
    from pangu_light.frontend.loading import resolve_model

    metadata = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    return graph_tokenizer(graph, metadata, Path(resolve_model(ALIAS)))


def held_out_perplexities(graph: Path, samples: int, seq_len: int, threads: int):
    """``evaluate(path) -> {"lambada": ppl, "wiki": ppl}`` on the same eval-split windows of
    ``graph``'s tokenizer for every graph it is given."""
    encode, bos = tokenizer(graph)
    evaluation = {data: sequences_for(data, encode, bos, samples=samples, seq_len=seq_len, seed=0, split="eval")
                  for data in ("lambada", "wiki")}

    def evaluate(path: Path) -> dict[str, float]:
        note(f"perplexity of {path.name}")
        return {data: perplexity(path, sequences, batch_size=4, threads=threads).perplexity
                for data, sequences in evaluation.items()}

    return evaluate


def statistics(graph: Path, workdir: Path, samples: int, seq_len: int, threads: int):
    stats_path, gram_path = workdir / "stats.npz", workdir / "gram.npz"
    if not (stats_path.exists() and gram_path.exists()):
        encode, bos = tokenizer(graph)
        sequences = sequences_for("wiki", encode, bos, samples=samples, seq_len=seq_len, seed=0, split="calib")
        meta = {"data": "wiki", "split": "calib", "samples": int(len(sequences)), "seq_len": seq_len, "seed": 0}
        note(f"calibrate {graph.name}: {sequences.shape} tokens (statistics, then Grams)")
        calibrate(graph, batched(sequences, 4), threads=threads, meta=meta).save(stats_path)
        collect_grams(graph, batched(sequences, 4), threads=threads, meta=meta).save(gram_path)
    return CalibrationStats.load(stats_path), GramStats.load(gram_path)


def build(original: Path, plan, grams: GramStats, method, intercept: bool, out: Path) -> None:
    model = ir.load(original)
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    if method is not None:
        refits = refit_and_set(ir.load(original), model, grams, plan, method=method, intercept=intercept)
        if refits.skipped:
            note(f"  left as they are: {refits.skipped}")
    ir.save(model, out, external_data=out.name + ".data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/refit-quality"))
    parser.add_argument("--graph", type=Path, help="an existing no-cache export of smollm2-135m (default: export one)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    original = args.graph
    if original is None:
        original = args.workdir / "orig.onnx"
        if not original.exists():
            cli = Path(sys.executable).with_name("pangu-light")
            subprocess.run([str(cli), "export", ALIAS, "-o", str(original)], check=True)
    stats, grams = statistics(original, args.workdir, args.calib_samples, args.seq_len, args.threads)
    model_map = ModelMap.from_model(ir.load(original))
    flap_stats = fluctuation_ranking(stats, grams, model_map, heads=True)

    evaluate = held_out_perplexities(original, args.eval_samples, args.seq_len, args.threads)

    base_parameters = GraphStats.from_model(ir.load(original)).total_parameters
    results = {("unpruned", ""): evaluate(original)}
    params = {("unpruned", ""): 1.0}
    for plan_name, targets in PLANS.items():
        for row, (method, intercept, flap_heads) in ROWS.items():
            plan = make_plan(model_map, flap_stats if flap_heads else stats, targets)
            out = args.workdir / f"{plan_name}{row}.onnx"
            note(f"compile {out.name}")
            build(original, plan, grams, method, intercept, out)
            params[(plan_name, row)] = GraphStats.from_model(ir.load(out)).total_parameters / base_parameters
            results[(plan_name, row)] = evaluate(out)
            out.unlink()
            out.with_name(out.name + ".data").unlink()

    print(f"SmolLM2-135M one-shot; calibration {stats.meta.get('data')} {stats.meta.get('samples')} x "
          f"{stats.meta.get('seq_len')} (calib split); eval {args.eval_samples} x {args.seq_len} (eval split)")
    print(f"{'plan':<11} {'row':<28} {'params':>6} {'lambada':>9} {'x unpr.':>7} {'wiki':>9} {'x unpr.':>7}")
    base = results[("unpruned", "")]
    for (plan_name, row), ppl in results.items():
        share = params[(plan_name, row)]
        print(f"{plan_name:<11} {row or '-':<28} {share:>6.3f} {ppl['lambada']:>9.2f} "
              f"{ppl['lambada'] / base['lambada']:>7.2f} {ppl['wiki']:>9.2f} {ppl['wiki'] / base['wiki']:>7.2f}")
    table = [{"plan": p, "row": r, "parameter_ratio": params[(p, r)], **v} for (p, r), v in results.items()]
    (args.workdir / "refit_quality.json").write_text(json.dumps(table, indent=2) + "\n")
    note(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
