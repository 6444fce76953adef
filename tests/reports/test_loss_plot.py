"""The loss plot against tokens or seconds, and several runs on one plot: the PNGs are written, the
points drawn are the entries' own (read back from the figure), and a bad axis is refused."""

from __future__ import annotations

import pytest

from pangu_light.reports import loss_plot

HISTORY = [
    {"step": 0, "tokens": 0, "elapsed_s": 0.0, "eval_kl": 2.0, "eval_nll": 5.0, "eval_perplexity": 148.4},
    {"step": 1, "tokens": 512, "elapsed_s": 4.0, "loss": 1.9, "kl": 1.9, "ce": 4.0},
    {"step": 2, "tokens": 1024, "elapsed_s": 8.5, "loss": 1.5, "kl": 1.5, "ce": 3.8},
    {"step": 2, "tokens": 1024, "elapsed_s": 9.0, "eval_kl": 1.4, "eval_nll": 4.2, "eval_perplexity": 66.7},
]


@pytest.mark.parametrize("x, key", [("tokens", "tokens"), ("seconds", "elapsed_s")])
def test_plot_history_uses_the_axis(tmp_path, monkeypatch, x, key):
    drawn = []
    monkeypatch.setattr(loss_plot, "_save", lambda figure, path: drawn.append(
        [list(line.get_xdata()) for ax in figure.axes for line in ax.lines]))
    loss_plot.plot_history(HISTORY, tmp_path / "a.png", x=x)
    assert drawn[0][0] == [h[key] for h in HISTORY if "loss" in h]
    assert drawn[0][-1] == [h[key] for h in HISTORY if "eval_perplexity" in h]


def test_plot_runs_and_the_real_png(tmp_path):
    loss_plot.plot_history(HISTORY, tmp_path / "a.png", x="seconds")
    loss_plot.plot_runs({"full KD": HISTORY, "top-k": HISTORY}, tmp_path / "runs.png", reference=20.0)
    for name in ("a.png", "runs.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="axis"):
        loss_plot.plot_history(HISTORY, tmp_path / "c.png", x="steps")
