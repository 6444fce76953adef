"""CLAP (paper 3.2.1) against plain layer removal on SmolLM2-135M: held-out perplexity, one run.

    python benchmarks/clap_quality.py [--workdir /tmp/clap-quality] [--graph orig.onnx] [--stats stats.npz]
        [--drops 6,10] [--variants plain,clap,margin,adjacent,sum] [--calib-samples 64]
        [--eval-data lambada] [--eval-samples 32] [--seq-len 256] [--threads 2] [--keep] [--json]

The stages are the CLI's, called through the functions behind it:

1. ``pangu-light export smollm2-135m -o WORKDIR/orig.onnx`` (no-cache graph), or ``--graph``.
2. ``pangu-light calibrate orig.onnx --data wiki --samples 64 --seq-len 256 -o stats.npz``
   (``calib.calibrate.calibrate_graph``), or ``--stats``.
3. Per number of removed layers N and variant, ``pangu-light plan stats.npz --drop-layers N
   [--clap ...] -o plan.json`` (``calib.planner.make_plan``) and ``pangu-light compile orig.onnx
   --plan plan.json -o graph.onnx`` (attach the plan, run ``plan.pipeline()``). Variants:

   plain     Targets(drop_layers=N): the layers with the lowest Block Influence go (ShortGPT style)
   clap      + clap=True: the paper's CLAP, top-K groups by eq. 5, K = the receiver's own count
   margin    + clap_margin=1.5: a moved group must score 1.5x the receiver's own (our variant)
   adjacent  + clap_adjacent=True: only the removed layer right after a kept one merges (our variant)
   sum       + clap_groups="sum": the receiver keeps every candidate group (bigger attention)

4. ``pangu-light eval orig.onnx ... --data lambada --samples 32 --seq-len 256``: perplexity of
   every graph on the same held-out token windows (``calib.evaluate.perplexity``, eval split).

No recovery training: this is the zero-shot starting point the paper's Table 3 compares
(there after training). Pruned graphs are deleted after their evaluation unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import onnx_ir as ir
from common import export_graph, note

from pangu_light.calib.planner import Targets, make_plan
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.reports.table import format_table

ALIAS = "smollm2-135m"
VARIANTS = {
    "plain": {},
    "clap": {"clap": True},
    "margin": {"clap": True, "clap_margin": 1.5},
    "adjacent": {"clap": True, "clap_adjacent": True},
    "sum": {"clap": True, "clap_groups": "sum"},
}
CLI_FLAGS = {  # how each variant reads as `pangu-light plan` flags (the last three: Targets fields)
    "plain": "", "clap": "--clap", "margin": "--clap (clap_margin=1.5)", "adjacent": "--clap (clap_adjacent=True)",
    "sum": "--clap (clap_groups='sum')",
}




def calibration(graph: Path, stats_path: Path, samples: int, seq_len: int, threads: int):
    from pangu_light.calib.calibrate import calibrate_graph
    from pangu_light.calib.stats import CalibrationStats

    if not stats_path.exists():
        note(f"pangu-light calibrate {graph} --data wiki --samples {samples} --seq-len {seq_len} -o {stats_path}")
        stats = calibrate_graph(graph, data="wiki", samples=samples, seq_len=seq_len, seed=0, batch_size=4,
                                threads=threads, quiet=True)
        stats.save(stats_path)
    return CalibrationStats.load(stats_path)


def compile_plan(graph: Path, plan, out: Path) -> dict:
    model = ir.load(graph)
    plan.attach(model)
    report = run_pipeline(model, plan.pipeline())
    ir.save(model, out)
    return dict(report.records[-1].stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clap-quality"))
    parser.add_argument("--graph", type=Path, help="an existing no-cache export of smollm2-135m (default: export one)")
    parser.add_argument("--stats", type=Path, help="existing statistics of that graph (default: calibrate)")
    parser.add_argument("--drops", default="6,10", help="numbers of layers to remove (comma-separated)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-data", default="lambada")
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the pruned graphs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    drops = [int(n) for n in args.drops.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from pangu_light.calib.evaluate import perplexity
    from pangu_light.calib.text import graph_tokenizer, sequences_for
    from pangu_light.passes.infra.graph_io import load_model_metadata

    original = args.graph or export_graph(ALIAS, args.workdir)
    stats = calibration(
        original, args.stats or args.workdir / "stats.npz", args.calib_samples, args.seq_len, args.threads
    )
    model_map = ModelMap.from_model(ir.load(original))
    order = [int(i) for i in stats.block_influence.argsort()]

    encode, eos_id = graph_tokenizer(original, load_model_metadata(original), None)
    sequences = sequences_for(
        args.eval_data, encode, eos_id, samples=args.eval_samples, seq_len=args.seq_len, seed=0, split="eval"
    )

    def evaluate(graph: Path) -> float:
        return perplexity(graph, sequences, batch_size=4, threads=args.threads).perplexity

    note(f"perplexity of the original on {args.eval_data} ({len(sequences)} x {args.seq_len}, eval split)")
    results = {
        "model": ALIAS,
        "graph": str(original),
        "calibration": dict(stats.meta),
        "block_influence_order": order,
        "eval": {"data": args.eval_data, "samples": int(len(sequences)), "seq_len": args.seq_len, "split": "eval"},
        "original": evaluate(original),
        "rows": [],
    }
    del model_map
    for n in drops:
        for name in variants:
            targets = Targets(drop_layers=n, **VARIANTS[name])
            plan = make_plan(ModelMap.from_model(ir.load(original)), stats, targets)
            plan.save(args.workdir / f"plan-{n}-{name}.json")
            out = args.workdir / f"drop{n}-{name}.onnx"
            note(f"drop {n} ({name}): layers {plan.drop_layers}; compiling {out.name}")
            compile_stats = compile_plan(original, plan, out)
            moved = sum(
                layer != m.into for m in {m.into: m for m in plan.clap_merges}.values() for layer, _ in m.groups
            )
            note(f"perplexity of {out.name}")
            row = {
                "drop": n,
                "variant": name,
                "layers": plan.drop_layers,
                "merges": compile_stats.get("merged", ""),
                "groups_moved": moved,
                "parameters": plan.estimate["parameters_after"],
                "perplexity": evaluate(out),
            }
            results["rows"].append(row)
            if not args.keep:
                os.remove(out)
    results["seconds"] = time.perf_counter() - started

    if args.json:
        print(json.dumps(results, indent=2))
        return
    ev = results["eval"]
    print(
        f"SmolLM2-135M, zero-shot (no recovery). Calibration: {stats.meta}. Lowest Block Influence first: {order[:12]}"
    )
    print(
        f"held-out perplexity on {ev['data']} ({ev['samples']} x {ev['seq_len']} tokens, eval split); "
        f"unpruned: {results['original']:.2f}"
    )
    table = [("drop", "variant", "perplexity", "vs plain", "params", "moved", "merged (into<-layer.group)")]
    plain = {r["drop"]: r["perplexity"] for r in results["rows"] if r["variant"] == "plain"}
    for r in results["rows"]:
        ratio = f"{r['perplexity'] / plain[r['drop']]:.3f}" if r["drop"] in plain else "-"
        table.append(
            (
                r["drop"],
                r["variant"],
                f"{r['perplexity']:.2f}",
                ratio,
                f"{r['parameters']:,}",
                r["groups_moved"],
                r["merges"] or "-",
            )
        )
    print(format_table(table, align="rlrrrrl"))
    print("plan flags: " + "; ".join(f"{v}: {CLI_FLAGS[v] or '(none)'}" for v in variants))
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
