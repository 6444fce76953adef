"""The loss plot of a distillation run: training loss (and its KL part) and held-out KL against
tokens seen on the left, held-out perplexity on the right, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pangu_light.core.files import atomic_write

__all__ = ["plot_history"]


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Plot a run's ``metrics.jsonl`` entries into the PNG ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_perplexity" in h]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        left.plot([h["tokens"] for h in train], [h["loss"] for h in train], label="train loss")
        if any(h["loss"] != h["kl"] for h in train):  # a cross-entropy mix: show its KL part too
            left.plot([h["tokens"] for h in train], [h["kl"] for h in train], label="train KL", alpha=0.6)
    if evals:
        left.plot([h["tokens"] for h in evals], [h["eval_kl"] for h in evals], "o-", label="held-out KL")
        right.plot([h["tokens"] for h in evals], [h["eval_perplexity"] for h in evals], "o-", color="C3")
    left.set_xlabel("tokens")
    left.set_ylabel("loss")
    left.set_yscale("log")
    left.legend()
    left.set_title("distillation loss")
    right.set_xlabel("tokens")
    right.set_ylabel("held-out perplexity")
    right.set_yscale("log")
    right.set_title("student perplexity")
    figure.tight_layout()
    try:
        with atomic_write(path, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=100)
    finally:
        plt.close(figure)
