"""Width pruning quality: held-out perplexity at several widths, with and without SLNP.

    .venv/bin/python benchmarks/width_quality.py ORIGINAL.onnx STATS.npz --out /tmp/width \\
        --level 512,3,1344 --level 448,2,1152 [--samples 32 --seq-len 256]

Each --level is hidden,heads_per_group,ffn (the same in every layer; not --uniform, whose
hidden must divide by the head count for a Llama config: 448 does not divide by 6). For each
level one plan is made from the statistics, compiled with and without SLNP, and every graph
(the original first) is evaluated on the same held-out sequences of the evaluation corpus in
one run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pangu_light.calib.evaluate import evaluate_graphs
from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.files import write_json
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model, save_model_atomic
from pangu_light.passes.infra.manager import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path)
    parser.add_argument("stats", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--level", action="append", required=True, help="hidden,heads_per_group,ffn")
    parser.add_argument("--data", default="lambada")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stats = CalibrationStats.load(args.stats)
    graphs = {"original": args.original}
    for level in args.level:
        hidden, heads, ffn = (int(v) for v in level.split(","))
        model = load_model(args.original)
        plan = make_plan(ModelMap.from_model(model), stats, Targets(hidden=hidden, heads_per_group=heads, ffn=ffn))
        for slnp in (True, False):
            name = f"h{hidden}-g{heads}-f{ffn}-{'slnp' if slnp else 'noslnp'}"
            graph = load_model(args.original)
            plan.attach(graph)
            run_pipeline(graph, plan.pipeline(slnp=slnp))
            save_model_atomic(graph, args.out / f"{name}.onnx")
            graphs[name] = args.out / f"{name}.onnx"
    results = evaluate_graphs(list(graphs.values()), data=args.data, samples=args.samples, seq_len=args.seq_len)
    base = GraphStats.from_model(load_model(args.original))
    table = {}
    for name, path in graphs.items():
        s = GraphStats.from_model(load_model(path))
        table[name] = {
            "perplexity": results[str(path)].perplexity,
            "parameter_ratio": s.total_parameters / base.total_parameters,
            "flop_ratio": s.flops_per_token / base.flops_per_token,
        }
        print(
            f"{name:<28} ppl {table[name]['perplexity']:>10.2f}  params {table[name]['parameter_ratio']:.3f}  "
            f"FLOPs {table[name]['flop_ratio']:.3f}",
            flush=True,
        )
    write_json(args.out / "width_quality.json", table)


if __name__ == "__main__":
    main()
