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
    prune-default+CLAP
                     what ``pangu-light prune --params P --drop-layers N        this project's CLAP,
                     --clap`` does with its defaults: prune-default's, plus     not the paper's: a
                     clap=True with prune's --clap-margin default (read from    margin on eq. 5's
                     the same argument set-up: 1.5, where Targets and the       ranking, then a
                     paper keep 1.0), and the CLAP receivers' o_proj refit      least-squares refit
                     over their merged heads toward prune's default             of the receivers
                     --clap-refit (next: the receiver's own attention output
                     plus that of the removed layer next to it; calib/clap_refit.py)

The first four rows are one-shot without refit (the paper's state before training). Every row has
the same widths: the budget P spread as ``prune``'s default ``--spread`` spreads it (``auto``: the
sensitivity spread, from one layer probe shared by every row; hidden-light before 2026-12-07).
With ``--recover-steps S`` (or ``--recover-minutes M``) every pruned row is then recovered by
``pangu-light recover`` (or ``distill``) for the same S optimizer steps (or M minutes of wall clock)
and scored again (rows "... + recovery").
All rows share one calibration pass (statistics, Grams, rotation: ``prune``'s), the same
perplexity windows and the same task items; prune-default+CLAP alone adds one more pass over the
same calibration windows, of the probe graph that computes its receivers' merged heads (as
``prune --clap`` does). Writes table3.md, table3.json and plan-*.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import paper_common as common

PRUNE_DEFAULT = "prune-default"
PRUNE_CLAP = "prune-default+CLAP"
PAPER_ROWS = {  # row -> the Targets fields beyond params / drop_layers / spread
    "minitron": {"clap": False, "slnp": False, "hidden_method": "select"},
    "+CLAP": {"clap": True, "slnp": False, "hidden_method": "select"},
    "+CLAP+SLNP": {"clap": True, "slnp": True, "hidden_method": "select"},
}
PRUNE_ROWS = {PRUNE_DEFAULT: (), PRUNE_CLAP: ("--clap",)}  # row -> prune's options beyond --params / --drop-layers
ROWS = [*PAPER_ROWS, *PRUNE_ROWS]
# prune's --refit and --clap-refit defaults (options of tools/prune_cmd.py alone, which benchmarks do not
# import; the tests that these rows' graphs are prune's pruned.onnx catch a change of either)
PRUNE_REFIT, PRUNE_CLAP_REFIT = "refit", "next"


def prune_defaults(params: float, drop_layers: int, model_map, options: tuple[str, ...] = ()):
    """(Targets, refit method) of ``pangu-light prune --params P --drop-layers N [options]``: the target
    options' defaults (with ``--clap``: its ``--clap-margin`` default too) from prune's own argument
    set-up (``tools.arguments``), prune's ``--hidden-method auto`` resolved for ``model_map`` and its
    ``--refit refit``."""
    from pangu_light.calib.budget import resolve_spread
    from pangu_light.calib.rotation import resolve_hidden_method
    from pangu_light.tools.arguments import add_target_arguments, targets_from_args

    parser = argparse.ArgumentParser()
    add_target_arguments(parser, prune=True)
    args = parser.parse_args(["--params", str(params), "--drop-layers", str(drop_layers), *options])
    targets = targets_from_args(args)
    targets = dataclasses.replace(targets, hidden_method=resolve_hidden_method("auto", model_map, targets),
                                  spread=resolve_spread(args.spread, targets, refit=PRUNE_REFIT == "refit"))
    return targets, PRUNE_REFIT


def row_targets(row: str, params: float, drop_layers: int, model_map):
    """(Targets, refit method or None) of a row; every row spreads the budget as prune does."""
    from pangu_light.calib.planner import Targets

    if row in PRUNE_ROWS:
        targets, refit = prune_defaults(params, drop_layers, model_map, PRUNE_ROWS[row])
        return targets, (refit if refit != "none" else None)
    default, _ = prune_defaults(params, drop_layers, model_map)
    return Targets(params=params, drop_layers=drop_layers, spread=default.spread, **PAPER_ROWS[row]), None


def receiver_refit(plan, refit: str | None) -> str | None:
    """prune's --clap-refit for a row's ``plan`` with ``refit``: prune refits CLAP receivers only
    after its ridge refit (``--refit refit``) of a plan with CLAP."""
    return PRUNE_CLAP_REFIT if refit == PRUNE_REFIT and plan.clap else None


def build_row(original, plan, out, collected, refit: str | None, args: argparse.Namespace) -> None:
    """``common.build`` of a row's ``plan`` as ``prune`` builds it: with ``refit`` the refit of every
    pruned projection from the shared Grams, and for a CLAP plan that of its receivers (their moments
    from one more pass over the shared calibration windows, this row's alone)."""
    target = receiver_refit(plan, refit)
    receivers = common.receiver_moments(original, plan, collected.sequences, args) if target else None
    common.build(original, plan, out, grams=collected.grams if refit else None, rotation=collected.rotation,
                 method=refit or "refit", receivers=receivers, receiver_target=target or PRUNE_CLAP_REFIT)


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
    collected, scales = common.collect_for(original, chosen.values(), args, rotation_path, model_map)
    stats = collected.stats
    scorer = common.Scorer(original, args)

    rows = {"unpruned": {**scorer.score(original, "unpruned"), "targets": None}}
    graphs = {}
    for row, (targets, refit) in chosen.items():
        targets = common.prune_spread(model_map, stats, targets)
        plan = make_plan(model_map, stats, targets, rotation=collected.rotation,
                         rotation_file=str(rotation_path.resolve()), grams=collected.grams, layer_scales=scales)
        plan.targets["refit"] = refit or "none"
        clap_refit = receiver_refit(plan, refit)
        if clap_refit:
            plan.targets["clap_refit"] = clap_refit
        plan.save(args.output / f"plan-{common.slug(row)}.json")
        out = work / f"{common.slug(row)}.onnx"
        common.note(f"{row}: drop layers {plan.drop_layers}; {plan.pipeline()}; refit {refit or 'none'}"
                    + (f", CLAP receivers {clap_refit}" if clap_refit else ""))
        build_row(original, plan, out, collected, refit, args)
        rows[row] = {**scorer.score(out, row), "targets": targets.to_json(), "refit": refit or "none",
                     **({"clap_refit": clap_refit} if clap_refit else {})}
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
    described = []
    for row, options in PRUNE_ROWS.items():
        if row in report["rows"]:
            r = report["rows"][row]
            command = " ".join(["pangu-light prune --params", str(args.params), "--drop-layers",
                                str(args.drop_layers), *options])
            receivers = (f", CLAP receivers refit {r['clap_refit']} (the project's CLAP, not the paper's)"
                         if "clap_refit" in r else "")
            described.append(f"- {row}: `{command}`'s defaults: {r['targets']}, refit {r['refit']}{receivers}")
    return [
        f"- shape: --params {args.params} --drop-layers {args.drop_layers} on {args.model}; "
        f"calibration {report['calibration']}",
        *described,
        f"- evaluation: {report['eval']}", f"- {recovery}", "",
        *common.row_table(report["rows"]), "",
    ]


TITLE = "Table 3 analogue: Minitron-style, + CLAP, + SLNP, the best re-initialisation"
