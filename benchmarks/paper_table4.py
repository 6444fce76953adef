"""Table 4 analogue (paper section 3.3): what to do with the post-norms of a sandwich-norm model
(Gemma-3-270M), before and after the same short recovery (``--table4-rows`` picks rows; the
sandwich reference is always there).

    row                  graph (from the same statistics)                     the paper's row
    sandwich             the post-norms kept (the model as trained)           "Sandwich-Norm"
    direct removal       drop-post-norm: each post-norm becomes the identity  "Direct Prune"
    absorption           absorb-post-norm: x * s_inv * gamma folded into      "Absorb" (eqs. 8-10)
                         o_proj / down_proj (s_inv: mean 1/rms of its input)
    partial absorption   only the post-norms whose log(1/rms) has a std of    this project's
                         at most --absorb-max-spread over the calibration     improvement
                         tokens (the others stay norms)

With ``--table4-params P`` every row is first pruned to P of the parameters (the same plan:
S_channel selection + SLNP, ``calib.planner``), as in the paper, where the post-norms are handled
in the pruned model; without it (default) the post-norm handling is measured alone. With
``--recover-steps S`` (or ``--recover-minutes M``) every row is recovered for the same S optimizer
steps (or M minutes) and scored again (except the sandwich row of an unpruned model: it is the
teacher itself, nothing to recover).
Writes table4.md, table4.json.
"""

from __future__ import annotations

import argparse

import paper_common as common

ROWS = ("sandwich", "direct removal", "absorption", "partial absorption")


def _targets(row: str, args: argparse.Namespace):
    from pangu_light.calib.planner import Targets

    fields = {"params": args.table4_params} if args.table4_params else {}
    if row == "absorption":
        fields["absorb_post_norms"] = True
    elif row == "partial absorption":
        fields.update(absorb_post_norms=True, absorb_max_spread=args.absorb_max_spread)
    return Targets(**fields)


def run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    import onnx_ir as ir

    from pangu_light.calib.planner import make_plan
    from pangu_light.passes.analysis.model_map import ModelMap
    from pangu_light.passes.surgery.post_norm import post_norms

    work = args.workdir
    original = common.export(args.gemma_model, work / f"{common.slug(args.gemma_model.split('/')[-1])}.onnx")
    stats = common.calibrate(original, args)
    model_map = ModelMap.from_model(ir.load(original))
    total_posts = len(post_norms(model_map))
    scorer = common.Scorer(original, args)
    rows, graphs = {}, {}
    for row in ["sandwich", *common.chosen_rows(args.table4_rows, ROWS[1:], "--table4-rows")]:
        targets = _targets(row, args)
        if row == "sandwich" and not args.table4_params:
            out = original
        else:
            plan = make_plan(model_map, stats, targets)
            out = work / f"t4-{common.slug(row)}.onnx"
            common.note(f"{row}: {plan.pipeline()}")
            common.build(original, plan, out, then="drop-post-norm" if row == "direct removal" else None)
        posts = len(post_norms(ModelMap.from_model(ir.load(out))))
        rows[row] = {**scorer.score(out, row), "targets": targets.to_json(), "post_norms_left": posts,
                     "post_norms": total_posts}
        graphs[row] = out
    if common.recovering(args):
        for row, graph in graphs.items():
            if graph == original:  # the teacher: distilling it into itself only adds noise
                continue
            distilled = common.recover(graph, args.gemma_model, args, work / f"recover-t4-{common.slug(row)}")
            rows[f"{row} + recovery"] = {**scorer.score(distilled, f"{row} + recovery"),
                                         "targets": rows[row]["targets"]}
    if not args.keep:
        for graph in graphs.values():
            if graph != original:
                graph.unlink()
    report = {"rows": rows, "eval": scorer.describe(), "calibration": dict(stats.meta),
              "recovery": common.recovery_note(args) if common.recovering(args) else None}
    return report, _markdown(report, args)


def _markdown(report: dict, args: argparse.Namespace) -> list[str]:
    rows = report["rows"]
    kept = ", ".join(f"{row} {r['post_norms_left']}" for row, r in rows.items() if "post_norms_left" in r)
    shape = f"pruned first to --params {args.table4_params}" if args.table4_params else "unpruned"
    recovery = (f"rows '+ recovery': {report['recovery']}" if report["recovery"]
                else "no recovery")
    return [
        f"- model: {args.gemma_model}, {shape}; --absorb-max-spread {args.absorb_max_spread}; "
        f"calibration {report['calibration']}",
        f"- post-norms left as norms (of {next(iter(rows.values()))['post_norms']}): {kept}",
        f"- evaluation: {report['eval']}", f"- {recovery}", "",
        *common.row_table(rows), "",
    ]


TITLE = "Table 4 analogue: post-norm handling of a sandwich-norm model"
