"""The PNG chart of a ``pangu-light bench`` report: the measured metrics per graph (median,
quartile bars) and each graph's measured speedup next to its ideal one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pangu_light.core.files import atomic_write
from pangu_light.reports.bench_table import short_provider

__all__ = ["plot_report"]


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG: the three measured metrics per graph (median, quartile bars), and each graph's
    measured speedup next to its ideal one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = report["graphs"]
    names = [Path(g["path"]).name for g in graphs]
    metrics = [
        ("prefill_ms", "prefill latency (ms, lower is better)"),
        ("decode_tokens_per_second", "decode tokens/s"),
        ("throughput_tokens_per_second", "end-to-end tokens/s"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for ax, (key, title) in zip(axes, metrics):
        stats = [g[key] for g in graphs]
        heights = [s["median"] if s else 0.0 for s in stats]
        errors = [
            [s["median"] - s["q1"] if s else 0.0 for s in stats],
            [s["q3"] - s["median"] if s else 0.0 for s in stats],
        ]
        ax.bar(range(len(graphs)), heights, yerr=errors, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(graphs)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    ax = axes[3]
    labels, measured, spread, ideal = [], [], [[], []], []
    for graph, name in zip(graphs[1:], names[1:]):
        for metric in ("prefill", "decode", "throughput"):
            s = graph["speedup"][metric]
            if s["measured"] is None:
                continue
            labels.append(f"{name}\n{metric}" if len(graphs) > 2 else metric)
            m = s["measured"]
            measured.append(m["median"])
            spread[0].append(m["median"] - m["q1"])
            spread[1].append(m["q3"] - m["median"])
            ideal.append(s["ideal"] or 0.0)
    if labels:
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], measured, width=0.4, yerr=spread, capsize=4, label="measured", color="tab:blue")
        ax.bar([i + 0.2 for i in x], ideal, width=0.4, label="ideal", color="tab:gray")
        for i, (value, target) in enumerate(zip(measured, ideal)):
            ax.annotate(
                f"{value:.2f}x",
                (i - 0.2, value),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 6),
                textcoords="offset points",
            )
            if target:
                ax.annotate(f"{target:.2f}x", (i + 0.2, target), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"speedup over {names[0]}", fontsize=10)
    work = report["workload"]
    machine = report["machine"]
    threads = report["session"]["threads"] or "default"
    providers = ", ".join(sorted({short_provider(p) for g in graphs for p in g["providers"][:1]}))
    fig.suptitle(
        f"workload {work['name']} (scale {work['scale']}, batch {work['batch']}), {work['repeats']} rounds; "
        f"{machine['cpu_model']}, {machine['logical_cores']} cores, {threads} threads, {providers}, "
        f"onnxruntime {machine['onnxruntime']}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, suffix=".png") as temporary:
        fig.savefig(temporary, format="png", dpi=100)
    plt.close(fig)
    return path
