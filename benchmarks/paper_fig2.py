"""Figure 2 analogue: quality retained against measured ONNX Runtime speedup, at several
compression levels, Pangu Light against the Minitron-style baseline.

    level            ``--fig2-levels P:N,...``: --params P with N layers dropped (the defaults aim at
                     about 1.3x, 1.6x and 2.1x measured on a CPU; the measured speedup is what is
                     plotted, whatever the level aimed at)
    methods          ``--fig2-methods``, rows of benchmarks/paper_table3.py: minitron (the baseline:
                     plain slicing and removal), prune-default (Pangu Light as this project's
                     ``prune`` does it by default: rotate + refit, its default spread), and
                     optionally +CLAP / +CLAP+SLNP (the paper's own operators, no refit) and
                     prune-default+CLAP (``prune --clap``: the project's CLAP, receivers refit)
    speedup          the unpruned graph's median latency / the pruned graph's, every graph run
                     alternately in one process (benchmarks/ort_latency.py: batch 1, --latency-seq
                     tokens, --repeats rounds, no-cache graphs)
    quality          perplexity retained = unpruned ppl / pruned ppl (held-out, eval split); with
                     tasks, accuracy retained = mean over tasks of pruned acc / unpruned acc

One-shot (no recovery): recovery at every level and method is table 3's job at one level.
Writes fig2.png, fig2.json and fig2.md.
"""

from __future__ import annotations

import argparse

import numpy as np
import paper_common as common
from paper_table3 import PRUNE_CLAP, ROWS, build_row, row_targets

LABELS = {"minitron": "Minitron-style baseline (plain slicing and removal)",
          "prune-default": "Pangu Light, prune's default (rotate + refit)",
          "+CLAP+SLNP": "CLAP + SLNP (the paper's operators, no refit)",
          PRUNE_CLAP: "Pangu Light, prune --clap's default (+ the project's CLAP, receivers refit)"}


def parse_levels(text: str) -> list[tuple[float, int]]:
    levels = []
    for part in text.split(","):
        params, _, drop = part.partition(":")
        levels.append((float(params), int(drop or 0)))
    return levels


def _accuracy_retained(row: dict, base: dict) -> float | None:
    if "lm_eval" not in row:
        return None
    ratios = [r["acc,none"] / base["lm_eval"]["results"][task]["acc,none"]
              for task, r in row["lm_eval"]["results"].items()
              if "acc,none" in r and base["lm_eval"]["results"][task]["acc,none"] > 0]
    return float(np.mean(ratios)) if ratios else None


def run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    import onnx_ir as ir

    from pangu_light.calib.planner import make_plan
    from pangu_light.passes.analysis.model_map import ModelMap

    methods = [m.strip() for m in args.fig2_methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ROWS]
    if unknown:
        raise SystemExit(f"--fig2-methods: unknown {unknown}; choose from {', '.join(ROWS)}")
    work = args.workdir
    original = common.export(args.model, work / f"{common.slug(args.model.split('/')[-1])}.onnx")
    model_map = ModelMap.from_model(ir.load(original))
    levels = parse_levels(args.fig2_levels)
    chosen = {(level, m): row_targets(m, *level, model_map) for level in levels for m in methods}
    rotation_path = work / "fig2-rotation.npz"
    collected, scales = common.collect_for(original, chosen.values(), args, rotation_path, model_map)
    stats = collected.stats
    scorer = common.Scorer(original, args)
    base = scorer.score(original, "unpruned")
    points, graphs = [], []
    for ((params, drop), method), (targets, refit) in chosen.items():
        targets = common.prune_spread(model_map, stats, targets)
        plan = make_plan(model_map, stats, targets, rotation=collected.rotation,
                         rotation_file=str(rotation_path.resolve()), grams=collected.grams, layer_scales=scales)
        out = work / f"fig2-{params:g}-{drop}-{common.slug(method)}.onnx"
        common.note(f"level {params}:{drop} {method}: {plan.pipeline()}; refit {refit or 'none'}")
        build_row(original, plan, out, collected, refit, args)
        row = scorer.score(out, f"{params}:{drop} {method}")
        points.append({"level": f"{params:g}:{drop}", "method": method, **row, "targets": targets.to_json(),
                       "refit": refit or "none",
                       "perplexity_retained": base["perplexity"]["perplexity"] / row["perplexity"]["perplexity"],
                       "accuracy_retained": _accuracy_retained(row, base)})
        graphs.append(out)
    del collected
    timing = common.latency([original, *graphs], args)
    for point, timed in zip(points, timing["rows"][1:], strict=True):
        point["speedup"], point["median_ms"], point["iqr_ms"] = timed["speedup"], timed["median_ms"], timed["iqr_ms"]
    if not args.keep:
        for graph in graphs:
            graph.unlink()
        rotation_path.unlink(missing_ok=True)
    report = {"unpruned": base, "points": points, "eval": scorer.describe(), "calibration": dict(stats.meta),
              "latency": {k: timing[k] for k in ("machine", "seq", "batch", "repeats")},
              "unpruned_median_ms": timing["rows"][0]["median_ms"]}
    _plot(report, methods, args)
    return report, _markdown(report)


def _plot(report: dict, methods: list[str], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("perplexity_retained", "perplexity retained (unpruned / pruned)")]
    if any(p["accuracy_retained"] is not None for p in report["points"]):
        panels.append(("accuracy_retained", "task accuracy retained (mean of pruned / unpruned)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for method in methods:
            chosen = sorted((p for p in report["points"] if p["method"] == method), key=lambda p: p["speedup"])
            ax.plot([p["speedup"] for p in chosen], [p[key] for p in chosen], marker="o",
                    label=LABELS.get(method, method))
            for p in chosen:
                ax.annotate(p["level"], (p["speedup"], p[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(f"measured ORT speedup ({report['latency']['machine']})")
        ax.set_ylabel(label)
        if key == "perplexity_retained":
            ax.set_yscale("log")  # one-shot perplexity ratios span orders of magnitude
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    figure.suptitle(f"Quality retained vs speedup, {args.model}, one-shot")
    common.save_figure(figure, args.output / "fig2.png")


def _markdown(report: dict) -> list[str]:
    lat = report["latency"]
    lines = [f"- evaluation: {report['eval']}; calibration {report['calibration']}",
             f"- latency: {lat['machine']}, batch {lat['batch']}, seq {lat['seq']}, {lat['repeats']} alternating "
             f"repeats, medians; unpruned {report['unpruned_median_ms']:.1f} ms", "- plot: fig2.png", "",
             "| level (params:dropped layers) | method | parameters | speedup | perplexity | perplexity retained "
             "| accuracy retained |", "|---|---|---|---|---|---|---|"]
    for p in report["points"]:
        acc = "" if p["accuracy_retained"] is None else f"{p['accuracy_retained']:.3f}"
        lines.append(f"| {p['level']} | {p['method']} | {100 * p['parameter_fraction']:.1f}% | {p['speedup']:.2f}x | "
                     f"{p['perplexity']['perplexity']:.2f} | {p['perplexity_retained']:.3f} | {acc} |")
    return [*lines, ""]


TITLE = "Figure 2 analogue: quality retained vs measured speedup"
