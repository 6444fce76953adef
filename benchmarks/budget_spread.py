"""How a parameter budget should be spread over the axes (issue 14, item 4), on SmolLM2-135M:
held-out perplexity of one budget split several ways, one run.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/budget_spread.py \\
        [--params 0.8] [--workdir /tmp/budget-spread] [--graph orig.onnx] [--calib-samples 64] [--eval-samples 8]

``--params F`` first shrank hidden, query heads per group and FFN width by one factor r and
solved the FFN width for the budget exactly (``--spread even``); what this measured made the
hidden size shrink a fifth as fast (``--spread hidden-light``, the default). Every row here has
the same parameter count (the planner solves the budget with the named axes fixed), the same
statistics, Grams and rotation
(wiki calib split, as benchmarks/rotation_quality.py), the project's best one-shot pipeline
(hidden cut by rotation, refit), and is scored on the same LAMBADA and wiki eval-split windows:

    default     Targets(params=F): the planner's default spread (hidden-light, calib/budget.py)
    even        Targets(params=F, spread="even"): every width by one factor (the first rule)
    hidden-H    hidden fixed at H (full, 15/16, 7/8, 3/4), heads and FFN share the rest by one factor
    heads-kept  every query head kept, hidden and FFN share the budget
    ffn-only    hidden and heads kept, the FFN width takes the whole cut
    sensitivity Targets(params=F, spread="sensitivity"): hidden-light's hidden size, heads and FFN
                per layer by the layer probe (calib.sensitivity; probe on prune's default probe tokens)
    default+flap-heads  the default spread, query heads ranked by FLAP's fluctuation metric
                (variance of each head's o_proj input times its weight columns' norm)
    default+obs the default spread's widths, filled by the refit-aware elimination (calib.obs)

Measured 2026-12-03 (AMD EPYC, 2 cores shared with three other jobs, load average 5-7; calib 64 x
256, eval 8 x 256; perplexity x unpruned, LAMBADA / wiki; unpruned 56.57 / 27.27)::

    --params 0.8   even (hidden 480, heads 3, FFN 1440)   2.97 / 2.68
                   hidden 576 (heads 2, FFN 1152)          2.44 / 2.11
                   hidden 544 (heads 2, FFN 1280)          2.46 / 2.25
                   hidden 512 (heads 2, FFN 1408)          2.63 / 2.61
                   hidden 576, heads 3 (FFN 1024)          2.88 / 2.08
    --params 0.62  even (hidden 416, heads 2, FFN 1312)   9.61 / 9.29
                   hidden 576 (heads 1, FFN 800)          13.26 / 7.12
                   hidden 544 (heads 2, FFN 768)           5.61 / 4.35
                   hidden 512 (heads 2, FFN 864)           5.99 / 4.74
                   hidden 448 (heads 2, FFN 1152)          7.62 / 6.19
                   hidden 576, heads 3 (FFN 544)           6.66 / 4.68

Then with the rule this made the default, at prune's --align 1 (--rows default,even; same load)::

    --params 0.8   even (hidden 500, heads 3, FFN 1333)   2.83 / 2.40
                   default (hidden 550, heads 2, FFN 1243) 2.40 / 2.26
    --params 0.62  even (hidden 440, heads 2, FFN 1175)   8.09 / 6.70
                   default (hidden 524, heads 2, FFN 838)  5.91 / 4.39

Query heads ranked by FLAP's fluctuation metric instead of S_head, the default spread
(--rows default,default+flap-heads; same load): mixed, so S_head stays the default ranking::

    --params 0.8   S_head 2.40 / 2.26    FLAP 3.63 / 2.19
    --params 0.62  S_head 5.91 / 4.39    FLAP 7.40 / 4.08
"""

from __future__ import annotations

import argparse
import json
import os
import time

import onnx_ir as ir
from common import add_graph_arguments, note, start
from refit_quality import ALIAS, held_out_perplexities, statistics
from rotation_quality import build, rotation_file

from pangu_light.calib.calibrate import calibration_sequences
from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.refit_plan import fluctuation_ranking
from pangu_light.calib.sensitivity_probe import PROBE_SAMPLES, PROBE_SEQ_LEN, probe_layers
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.rewrites.rotate_hidden import load_rotation


def allocations(model_map: ModelMap, params: float, align: int) -> dict[str, Targets]:
    hidden = model_map.hidden_size
    heads = max(l.attention.num_heads // l.attention.num_kv_heads for l in model_map.layers)
    rows = {"default": Targets(params=params, align=align), "even": Targets(params=params, align=align, spread="even"),
            "default+flap-heads": Targets(params=params, align=align),  # heads ranked by FLAP's fluctuation
            "default+obs": Targets(params=params, align=align, selection="obs"),
            "default+obs-ffn": Targets(params=params, align=align, selection="obs-ffn"),
            "default+obs-heads": Targets(params=params, align=align, selection="obs-heads")}
    for fraction, name in ((1.0, "full"), (0.9375, "15/16"), (0.875, "7/8"), (0.75, "3/4")):
        rows[f"hidden-{name}"] = Targets(params=params, hidden=int(32 * round(fraction * hidden / 32)), align=align)
    rows["heads-kept"] = Targets(params=params, heads_per_group=heads, align=align)
    rows["ffn-only"] = Targets(params=params, hidden=hidden, heads_per_group=heads, align=align)
    rows["sensitivity"] = Targets(params=params, align=align, spread="sensitivity")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_arguments(parser, ALIAS, workdir="/tmp/budget-spread", eval_samples=8)
    parser.add_argument("--params", type=float, default=0.8)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--align", type=int, default=32, help="planner --align for every row (prune's default is 1)")
    parser.add_argument("--rows", help="only these rows, comma-separated (default: all)")
    args = parser.parse_args()
    original, started, load_start = start(args, ALIAS)
    stats, grams = statistics(original, args.workdir, args.calib_samples, args.seq_len, args.threads)
    rotation_path = rotation_file(original, args.workdir, args.calib_samples, args.seq_len, args.threads)
    rotation = load_rotation(rotation_path)
    model_map = ModelMap.from_model(ir.load(original))
    evaluate = held_out_perplexities(original, args.eval_samples, args.seq_len, args.threads)

    base_parameters = GraphStats.from_model(ir.load(original)).total_parameters
    rows = [{"row": "unpruned", "parameter_ratio": 1.0, "shape": {}, **evaluate(original)}]
    chosen = allocations(model_map, args.params, args.align)
    layer_scales = None
    if not args.rows or "sensitivity" in args.rows.split(","):  # prune's layer probe, on its defaults
        sequences, _ = calibration_sequences(original, "wiki", args.calib_samples, args.seq_len, 0, None)
        layer_scales = probe_layers(original, stats, grams, sequences[:PROBE_SAMPLES, :PROBE_SEQ_LEN],
                                    threads=args.threads)
    for name, targets in chosen.items():
        if args.rows and name not in args.rows.split(","):
            continue
        targets.hidden_method = "rotate"
        ranking = fluctuation_ranking(stats, grams, model_map) if name.endswith("+flap-heads") else stats
        try:
            plan = make_plan(model_map, ranking, targets, rotation=rotation, rotation_file=str(rotation_path.resolve()),
                             grams=grams, layer_scales=layer_scales)
        except PanguLightError as error:
            note(f"{name}: not plannable ({error})")
            continue
        out = args.workdir / f"{name.replace('/', '_')}.onnx"
        note(f"compile {out.name}: {plan.pipeline()}")
        build(original, plan, grams, True, rotation, out)
        shape = {k: plan.estimate[k] for k in ("hidden", "heads_per_group", "kv_groups", "ffn", "layers")}
        rows.append({"row": name, "parameter_ratio": GraphStats.from_model(ir.load(out)).total_parameters
                     / base_parameters, "shape": shape, **evaluate(out)})
        out.unlink()
        out.with_name(out.name + ".data").unlink()

    print(f"SmolLM2-135M --params {args.params} spread several ways, one-shot rotate+refit; calibration wiki "
          f"{args.calib_samples} x {args.seq_len}; eval {args.eval_samples} x {args.seq_len} per set; load average "
          f"at start {load_start}, at end {os.getloadavg()}")
    print(f"{'row':<12} {'params':>6} {'lambada':>9} {'x unpr.':>7} {'wiki':>9} {'x unpr.':>7}  shape")
    base = rows[0]
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if not isinstance(v, list)) or "-"
        ffn = r["shape"].get("ffn")
        shape += f" ffn={min(ffn)}..{max(ffn)}" if isinstance(ffn, list) else ""
        print(f"{r['row']:<12} {r['parameter_ratio']:>6.3f} {r['lambada']:>9.2f} "
              f"{r['lambada'] / base['lambada']:>7.2f} {r['wiki']:>9.2f} {r['wiki'] / base['wiki']:>7.2f}  {shape}")
    (args.workdir / "budget_spread.json").write_text(json.dumps(rows, indent=2) + "\n")
    note(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
