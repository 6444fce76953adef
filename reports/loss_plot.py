"""The loss plot of a distillation run: training loss (and its KL part) and held-out KL on the left,
held-out perplexity on the right, as a PNG, against tokens seen or elapsed training seconds
(``metrics.jsonl``'s ``tokens`` and ``elapsed_s``); and ``plot_runs``, the held-out perplexity of
several runs on one plot, so that methods can be compared per token or per second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pangu_light.core.files import atomic_write

__all__ = ["AXES", "plot_history", "plot_runs"]

# x axis name -> (metrics key, label)
AXES = {"tokens": ("tokens", "tokens"), "seconds": ("elapsed_s", "elapsed training seconds")}


def _axis(x: str) -> tuple[str, str]:
    if x not in AXES:
        raise ValueError(f"plot axis {x!r}: use one of {', '.join(AXES)}")
    return AXES[x]


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=100)
    finally:
        plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict[str, Any]], path: Path, *, x: str = "tokens") -> None:
    """Plot a run's ``metrics.jsonl`` entries into the PNG ``path`` (written atomically), against
    ``x`` = "tokens" or "seconds" (entries without ``elapsed_s``, from older runs, are left out)."""
    key, label = _axis(x)
    plt = _pyplot()
    train = [h for h in history if "loss" in h and key in h]
    evals = [h for h in history if "eval_perplexity" in h and key in h]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        left.plot([h[key] for h in train], [h["loss"] for h in train], label="train loss")
        if any(h["loss"] != h["kl"] for h in train):  # a cross-entropy mix or top-k KD: show the KL too
            left.plot([h[key] for h in train], [h["kl"] for h in train], label="train KL", alpha=0.6)
    if evals:
        left.plot([h[key] for h in evals], [h["eval_kl"] for h in evals], "o-", label="held-out KL")
        right.plot([h[key] for h in evals], [h["eval_perplexity"] for h in evals], "o-", color="C3")
    left.set_xlabel(label)
    left.set_ylabel("loss")
    left.set_yscale("log")
    left.legend()
    left.set_title("distillation loss")
    right.set_xlabel(label)
    right.set_ylabel("held-out perplexity")
    right.set_yscale("log")
    right.set_title("student perplexity")
    figure.tight_layout()
    _save(figure, path)


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: Path, *, x: str = "seconds",
              reference: float | None = None) -> None:
    """Held-out perplexity of each run (label -> its metrics entries) against ``x`` on one plot,
    with the teacher's perplexity (``reference``) as a dashed line."""
    key, label = _axis(x)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, history in runs.items():
        evals = [h for h in history if "eval_perplexity" in h and key in h]
        axes.plot([h[key] / (60.0 if x == "seconds" else 1.0) for h in evals],
                  [h["eval_perplexity"] for h in evals], "o-", label=name)
    if reference is not None:
        axes.axhline(reference, linestyle="--", color="gray", label="teacher")
    axes.set_xlabel("elapsed training minutes" if x == "seconds" else label)
    axes.set_ylabel("held-out perplexity")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    _save(figure, path)
