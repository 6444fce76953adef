"""The outputs of ``pangu-light search`` from its JSON-ready rows: the Markdown table of the
Pareto front (and of every candidate with a proxy), and the PNG of proxy against speedup."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pangu_light.core.files import atomic_write

__all__ = ["markdown_table", "plot_front"]


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], chosen: str | None = None) -> str:
    """One Markdown row per shape: label, parameters, speedup (measured or predicted), KL."""
    lines = [
        "| shape | kind | parameters | speedup | measured | KL (nats/token) |" + (" ppl |" if any(
            "perplexity" in r for r in rows) else ""),
        "|---|---|---:|---:|:-:|---:|" + ("---:|" if any("perplexity" in r for r in rows) else ""),
    ]
    for r in rows:
        mark = " **(chosen)**" if r["label"] == chosen else ""
        line = (f"| {r['label']}{mark} | {r['kind']} | {r['parameter_ratio']:.3f} | {r['speedup']:.2f}x | "
                f"{'yes' if r['measured'] else 'model'} | {_cell(r.get('kl'), 4)} |")
        if "perplexity" in r or any("perplexity" in x for x in rows):
            line += f" {_cell(r.get('perplexity'), 2)} |"
        lines.append(line)
    return "\n".join(lines)


def plot_front(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], target: float,
               path: str | Path, chosen: str | None = None) -> Path:
    """Every shape with a proxy (measured: filled, predicted speed: hollow), the front as a line,
    the target as a vertical line, the chosen shape circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for measured, style in ((True, dict(color="tab:blue")), (False, dict(facecolors="none", edgecolors="tab:gray"))):
        points = [r for r in rows if r.get("kl") is not None and r["measured"] == measured]
        ax.scatter([r["speedup"] for r in points], [r["kl"] for r in points], s=18,
                   label="measured speed" if measured else "predicted speed", **style)
    ax.plot([r["speedup"] for r in front], [r["kl"] for r in front], "-", color="tab:orange", label="Pareto front")
    ax.axvline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target:g}x")
    for r in rows:
        if r["label"] == chosen:
            ax.scatter([r["speedup"]], [r["kl"]], s=120, facecolors="none", edgecolors="tab:red", label="chosen")
    ax.set_xlabel("speedup over the unpruned model (end-to-end throughput)")
    ax.set_ylabel("KL to the unpruned model (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, suffix=".png") as temporary:
        fig.savefig(temporary, format="png", dpi=110)
    plt.close(fig)
    return path
