"""Table 3 analogue (paper section 4.3): Minitron-style pruning, then CLAP, then SLNP, then the
project's best re-initialisation, one shape with width and depth removed together, before and after
the same recovery budget.

    row              plan (calib.planner.Targets)                               the paper's method
    unpruned         -                                                          -
    minitron         params=P, drop_layers=N, clap=False, slnp=False            same statistics, plain
                                                                                slicing, plain removal
    +CLAP            params=P, drop_layers=N, clap=True,  slnp=False            3.2.1, eq. 5
    +CLAP+SLNP       params=P, drop_layers=N, clap=True,  slnp=True             3.2.2, eq. 6
    rotate+refit     params=P, drop_layers=N, clap=True, hidden_method=rotate,  this project's one-shot
                     then the ridge refit of every pruned o_proj/down_proj      re-initialisation (README:
                                                                                --hidden-method rotate)

The first four rows are one-shot (no refit: the paper's state before training). With
``--recover-minutes M`` every pruned row is then recovered by ``pangu-light recover`` (or
``distill``) for the same M minutes of wall clock and scored again (rows "... + recovery").
All rows share one set of statistics (``calibrate --data wiki``), the same perplexity windows and
the same task items. Writes table3.md, table3.json and plan-*.json.
"""

from __future__ import annotations

import argparse

import paper_common as common

ROWS = {  # row -> (the Targets fields beyond params / drop_layers, refit)
    "minitron": ({"clap": False, "slnp": False}, False),
    "+CLAP": ({"clap": True, "slnp": False}, False),
    "+CLAP+SLNP": ({"clap": True, "slnp": True}, False),
    "rotate+refit": ({"clap": True, "hidden_method": "rotate"}, True),
}


def run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    import onnx_ir as ir

    from pangu_light.calib.planner import Targets, make_plan
    from pangu_light.passes.analysis.model_map import ModelMap

    work = args.workdir
    original = common.export(args.model, work / f"{common.slug(args.model.split('/')[-1])}.onnx")
    stats = common.calibrate(original, args)
    model_map = ModelMap.from_model(ir.load(original))
    rotation_path = work / "rotation.npz"
    chosen = [ROWS[row] for row in common.chosen_rows(args.table3_rows, ROWS, "--table3-rows")]
    rotation = common.rotation(original, args, rotation_path) if any(
        f.get("hidden_method") == "rotate" for f, _ in chosen) else None
    gram_stats = common.grams(original, args) if any(refit for _, refit in chosen) else None
    scorer = common.Scorer(original, args)

    rows = {"unpruned": {**scorer.score(original, "unpruned"), "targets": None}}
    graphs = {}
    for row in common.chosen_rows(args.table3_rows, ROWS, "--table3-rows"):
        fields, refit = ROWS[row]
        targets = Targets(params=args.params, drop_layers=args.drop_layers, **fields)
        plan = make_plan(model_map, stats, targets, rotation=rotation, rotation_file=str(rotation_path.resolve()))
        plan.targets["refit"] = "refit" if refit else "none"
        plan.save(args.output / f"plan-{common.slug(row)}.json")
        out = work / f"{common.slug(row)}.onnx"
        common.note(f"{row}: drop layers {plan.drop_layers}; {plan.pipeline()}")
        common.build(original, plan, out, grams=gram_stats if refit else None, rotation=rotation)
        rows[row] = {**scorer.score(out, row), "targets": targets.to_json(), "refit": refit}
        graphs[row] = out
    recovered = {}
    if args.recover_minutes > 0:
        for row, graph in graphs.items():
            distilled = common.recover(graph, args.model, args, work / f"recover-{common.slug(row)}")
            recovered[f"{row} + recovery"] = {**scorer.score(distilled, f"{row} + recovery"),
                                              "targets": rows[row]["targets"]}
    rows.update(recovered)
    if not args.keep:
        for graph in graphs.values():
            graph.unlink()
        rotation_path.unlink(missing_ok=True)
    report = {"rows": rows, "eval": scorer.describe(), "calibration": dict(stats.meta),
              "recovery": common.recovery_note(args) if recovered else None}
    return report, _markdown(report, args)


def _markdown(report: dict, args: argparse.Namespace) -> list[str]:
    recovery = (f"rows '+ recovery': {report['recovery']}" if report["recovery"]
                else "no recovery (--recover-minutes 0)")
    return [
        f"- shape: --params {args.params} --drop-layers {args.drop_layers} on {args.model}; "
        f"calibration {report['calibration']}",
        f"- evaluation: {report['eval']}", f"- {recovery}", "",
        *common.row_table(report["rows"]), "",
    ]


TITLE = "Table 3 analogue: Minitron-style, + CLAP, + SLNP, the best re-initialisation"
