"""Figure 3 analogue: the mean and standard deviation over channels of every post-norm's gamma,
per layer, of a sandwich-norm model (Gemma-3-270M):

    original        the effective gamma g (Gemma: 1 + w) of the exported graph
    pruned + SLNP   after ``--fig3-params P`` with ``prune``'s defaults for the widths (its spread:
                    sensitivity, from one layer probe; S_channel selection of the hidden channels, no
                    layer dropped, so layers line up): the kept channels' g rescaled by SLNP (eq. 6),
                    g' = g[kept] * ||g|| / ||g[kept]||, read back from the compiled graph
    absorbed        the per-channel scale that absorption folds into o_proj / down_proj:
                    s_inv * g' (eq. 9; s_inv the mean 1/rms of the norm's input over the
                    calibration tokens) for the same pruned model

The paper's Figure 3 shows that post-norm gammas vary little within a layer, which is what makes
replacing the norm by a fixed per-channel scale plausible; ``cv`` (std / |mean|) per layer is in
the JSON. Writes fig3.png, fig3.json and fig3.md.
"""

from __future__ import annotations

import argparse

import numpy as np
import paper_common as common


def _gammas(model_map) -> dict[tuple[int, str], np.ndarray]:
    from pangu_light.passes.surgery.post_norm import post_norms

    return {(p.layer, p.role): p.norm.effective_gamma() for p in post_norms(model_map)}


def run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    import onnx_ir as ir
    from paper_table3 import prune_defaults

    from pangu_light.calib.planner import make_plan
    from pangu_light.passes.analysis.model_map import ModelMap
    from pangu_light.passes.surgery.post_norm import post_norms

    work = args.workdir
    original = common.export(args.gemma_model, work / f"{common.slug(args.gemma_model.split('/')[-1])}.onnx")
    model_map = ModelMap.from_model(ir.load(original))
    # Only the gammas are read, so the refit prune would apply to o_proj/down_proj is not built.
    targets, _ = prune_defaults(args.fig3_params, 0, model_map)
    collected, scales = common.collect_for(original, [(targets, None)], args, work / "fig3-rotation.npz",
                                           model_map)
    stats = collected.stats
    targets = common.prune_spread(model_map, stats, targets)
    names = {(p.layer, p.role): p.norm.gamma.name for p in post_norms(model_map)}
    plan = make_plan(model_map, stats, targets, grams=collected.grams, layer_scales=scales)
    pruned = work / "fig3-pruned.onnx"
    common.note(f"pruned + SLNP: {plan.pipeline()}")
    common.build(original, plan, pruned)
    before, after = _gammas(model_map), _gammas(ModelMap.from_model(ir.load(pruned)))
    if not args.keep:
        pruned.unlink()
    states = {"original": before, "pruned + SLNP": after,
              "absorbed (s_inv x g')": {key: stats.s_inv[names[key]] * g for key, g in after.items()}}
    series = {}
    for state, values in states.items():
        for role in ("post_attn", "post_ffn"):
            keys = sorted(k for k in values if k[1] == role)
            mean = [float(values[k].mean()) for k in keys]
            std = [float(values[k].std()) for k in keys]
            series[f"{state}/{role}"] = {"layers": [k[0] for k in keys], "mean": mean, "std": std,
                                         "cv": [s / max(abs(m), 1e-30) for m, s in zip(mean, std, strict=True)],
                                         "channels": [int(values[k].size) for k in keys],
                                         "s_inv": [stats.s_inv[names[k]] for k in keys]}
    _plot(series, states, args)
    report = {"series": series, "calibration": dict(stats.meta), "pipeline": str(plan.pipeline()),
              "spread": targets.spread,
              "hidden": [model_map.hidden_size, len(plan.hidden)], "s_inv_range": [min(stats.s_inv.values()),
                                                                                   max(stats.s_inv.values())]}
    return report, _markdown(report, args)


def _plot(series: dict, states: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for column, role in enumerate(("post_attn", "post_ffn")):
        for row, stat in enumerate(("mean", "std")):
            ax = axes[row][column]
            for state in states:
                s = series[f"{state}/{role}"]
                ax.plot(s["layers"], s[stat], marker="o", markersize=3, label=state)
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.set_title(f"{role} gamma: {stat} over channels")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("layer")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Post-norm gammas per layer, {args.gemma_model} (pruned to --params {args.fig3_params})")
    common.save_figure(figure, args.output / "fig3.png")


def _markdown(report: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"- model: {args.gemma_model}; hidden {report['hidden'][0]} -> {report['hidden'][1]} "
             f"(--params {args.fig3_params}, no layer dropped, {report['spread']} spread); "
             f"calibration {report['calibration']}; "
             f"s_inv from {report['s_inv_range'][0]:.3g} to {report['s_inv_range'][1]:.3g}",
             "- plot: fig3.png (symlog y axis); numbers: fig3.json", "",
             "| state | role | mean over layers of mean(g) | of std(g) | of std/mean | largest std/mean |",
             "|---|---|---|---|---|---|"]
    for name, s in report["series"].items():
        state, role = name.split("/")
        lines.append(f"| {state} | {role} | {np.mean(s['mean']):.4g} | {np.mean(s['std']):.4g} | "
                     f"{np.mean(s['cv']):.3f} | {max(s['cv']):.3f} |")
    return [*lines, ""]


TITLE = "Figure 3 analogue: post-norm gammas per layer"
