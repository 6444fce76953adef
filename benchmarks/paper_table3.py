"""Table 3 analogue (paper section 4.3): Minitron-style pruning, then CLAP, then SLNP, then the
project's best re-initialisation, one shape with width and depth removed together, before and after
the same recovery budget.

    row              plan (calib.planner.Targets)                               the paper's method
    unpruned         -                                                          -
    minitron         params=P, drop_layers=N, clap=False, slnp=False,           same statistics, plain
                     hidden_method=select, no refit                             slicing, plain removal
    +CLAP            params=P, drop_layers=N, clap=True,  slnp=False            3.2.1, eq. 5
    +CLAP+SLNP       params=P, drop_layers=N, clap=True,  slnp=True             3.2.2, eq. 6
    prune-default    what ``pangu-light prune --params P --drop-layers N``     this project's one-shot
                     does with its defaults (its target options' defaults       re-initialisation
                     from tools.arguments): the residual stream rotated (hidden_method
                     rotate for pre-norm families), the ridge refit of every
                     pruned o_proj/down_proj, no CLAP

The first four rows are one-shot without refit (the paper's state before training). Every row has
the same widths: the budget P spread as ``prune``'s default ``--spread`` spreads it (hidden-light).
With ``--recover-steps S`` (or ``--recover-minutes M``) every pruned row is then recovered by
``pangu-light recover`` (or ``distill``) for the same S optimizer steps (or M minutes of wall clock)
and scored again (rows "... + recovery").
All rows share one calibration pass (statistics, Grams, rotation: ``prune``'s), the same
perplexity windows and the same task items. Writes table3.md, table3.json and plan-*.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import paper_common as common

PRUNE_DEFAULT = "prune-default"
ROWS = {  # row -> the Targets fields beyond params / drop_layers / spread (None: prune's defaults)
    "minitron": {"clap": False, "slnp": False, "hidden_method": "select"},
    "+CLAP": {"clap": True, "slnp": False, "hidden_method": "select"},
    "+CLAP+SLNP": {"clap": True, "slnp": True, "hidden_method": "select"},
    PRUNE_DEFAULT: None,
}


def prune_defaults(params: float, drop_layers: int, model_map):
    """(Targets, refit method) of ``pangu-light prune --params P --drop-layers N``: the target options'
    defaults from prune's own argument set-up (``tools.arguments``), prune's ``--hidden-method auto``
    resolved for ``model_map`` and its ``--refit refit`` (benchmarks import no command module; the
    test that this row's graph is prune's pruned.onnx catches a change of those two defaults)."""
    from pangu_light.calib.rotation import resolve_hidden_method
    from pangu_light.tools.arguments import add_target_arguments, targets_from_args

    parser = argparse.ArgumentParser()
    add_target_arguments(parser)
    args = parser.parse_args(["--params", str(params), "--drop-layers", str(drop_layers)])
    targets = targets_from_args(args)
    if targets.spread == "sensitivity":
        raise SystemExit("prune's default --spread is sensitivity: its layer probe is not wired into the experiments")
    targets = dataclasses.replace(targets, hidden_method=resolve_hidden_method("auto", model_map, targets))
    return targets, "refit"


def row_targets(row: str, params: float, drop_layers: int, model_map):
    """(Targets, refit method or None) of a row; every row spreads the budget as prune does."""
    from pangu_light.calib.planner import Targets

    default, refit = prune_defaults(params, drop_layers, model_map)
    if ROWS[row] is None:
        return default, (refit if refit != "none" else None)
    return Targets(params=params, drop_layers=drop_layers, spread=default.spread, **ROWS[row]), None


def run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    import onnx_ir as ir

    from pangu_light.calib.planner import make_plan
    from pangu_light.passes.analysis.model_map import ModelMap

    work = args.workdir
    original = common.export(args.model, work / f"{common.slug(args.model.split('/')[-1])}.onnx")
    model_map = ModelMap.from_model(ir.load(original))
    names = common.chosen_rows(args.table3_rows, ROWS, "--table3-rows")
    chosen = {row: row_targets(row, args.params, args.drop_layers, model_map) for row in names}
    rotation_path = work / "rotation.npz"
    collected = common.collect(
        original, args, grams=any(refit for _, refit in chosen.values()),
        rotation=rotation_path if any(t.hidden_method == "rotate" for t, _ in chosen.values()) else None)
    stats = collected.stats
    scorer = common.Scorer(original, args)

    rows = {"unpruned": {**scorer.score(original, "unpruned"), "targets": None}}
    graphs = {}
    for row, (targets, refit) in chosen.items():
        plan = make_plan(model_map, stats, targets, rotation=collected.rotation,
                         rotation_file=str(rotation_path.resolve()))
        plan.targets["refit"] = refit or "none"
        plan.save(args.output / f"plan-{common.slug(row)}.json")
        out = work / f"{common.slug(row)}.onnx"
        common.note(f"{row}: drop layers {plan.drop_layers}; {plan.pipeline()}; refit {refit or 'none'}")
        common.build(original, plan, out, grams=collected.grams if refit else None, rotation=collected.rotation,
                     method=refit or "refit")
        rows[row] = {**scorer.score(out, row), "targets": targets.to_json(), "refit": refit or "none"}
        graphs[row] = out
    del collected
    recovered = {}
    if common.recovering(args):
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
                else "no recovery")
    default = report["rows"].get(PRUNE_DEFAULT)
    described = ([f"- {PRUNE_DEFAULT}: `pangu-light prune --params {args.params} --drop-layers {args.drop_layers}`"
                  f"'s defaults: {default['targets']}, refit {default['refit']}"] if default else [])
    return [
        f"- shape: --params {args.params} --drop-layers {args.drop_layers} on {args.model}; "
        f"calibration {report['calibration']}",
        *described,
        f"- evaluation: {report['eval']}", f"- {recovery}", "",
        *common.row_table(report["rows"]), "",
    ]


TITLE = "Table 3 analogue: Minitron-style, + CLAP, + SLNP, the best re-initialisation"
