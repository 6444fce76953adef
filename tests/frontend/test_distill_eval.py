"""Held-out evaluation over several sources (``--eval-data a,b``): micro-batches never straddle
two sources, each source's perplexity and KL are those a run evaluating that source alone reports,
and the pooled numbers weigh the sources by their tokens; ``--eval-interval`` spaces evaluations
along the training clock (a fake one: a step takes 10 s)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_distill import distill, history, setup  # noqa: F401  (setup is the module fixture)
from test_distill_budget import fake_clock  # noqa: F401  (a fixture)

from pangu_light.frontend.distill.evaluation import EvalTotals, eval_chunks


def test_chunks_keep_to_their_source():
    windows = np.arange(7 * 3).reshape(7, 3)
    chunks = eval_chunks(windows, 2, [("a", 3), ("b", 4)])
    assert [(name, len(ids)) for name, ids in chunks] == [("a", 2), ("a", 1), ("b", 2), ("b", 2)]
    assert np.array_equal(np.concatenate([ids.numpy() for _, ids in chunks]), windows)
    with pytest.raises(ValueError, match="add up"):
        eval_chunks(windows, 2, [("a", 3)])
    totals = EvalTotals()
    totals.add("a", 1.0, 10, 2.0, 9)
    totals.add("b", 3.0, 30, 1.0, 27)
    metrics = totals.metrics()
    assert metrics["eval_kl"] == pytest.approx((10 + 90) / 40) and metrics["eval_kl_b"] == 3.0
    assert metrics["eval_perplexity"] == pytest.approx(math.exp((18 + 27) / 36))
    assert metrics["eval_perplexity_a"] == pytest.approx(math.exp(2.0))


@pytest.mark.slow
def test_each_source_is_reported_as_alone(setup, tmp_path):  # noqa: F811
    text = str(setup / "text.txt")
    common = ["--steps", "2", "--lr", "1e-3", "--eval-samples", "6", "--no-export", "--train-samples", "8"]
    assert distill(setup, "uniform.onnx", tmp_path / "both", *common, "--eval-data", f"lambada,{text}") == 0
    assert distill(setup, "uniform.onnx", tmp_path / "lambada", *common, "--eval-data", "lambada") == 0
    assert distill(setup, "uniform.onnx", tmp_path / "text", *common, "--eval-data", text) == 0
    both = [h for h in history(tmp_path / "both") if "eval_kl" in h]
    for name in ("lambada", "text"):
        alone = [h for h in history(tmp_path / name) if "eval_kl" in h]
        assert [h["step"] for h in alone] == [h["step"] for h in both] == [0, 2]
        for a, b in zip(both, alone):  # the same windows and weights: equal up to summation order
            assert a[f"eval_perplexity_{name}"] == pytest.approx(b["eval_perplexity"], rel=1e-5)
            assert a[f"eval_kl_{name}"] == pytest.approx(b["eval_kl"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_evaluations_follow_the_interval(setup, tmp_path, fake_clock):  # noqa: F811
    out = tmp_path / "interval"
    assert distill(setup, "uniform.onnx", out, "--steps", "8", "--eval-every", "100", "--eval-interval", "25s",
                   "--train-samples", "32", "--no-export") == 0
    evals = [(h["step"], h["elapsed_s"]) for h in history(out) if "eval_kl" in h]
    # 10 s a step: 30 s >= 25 s after step 0, then 60 s, and the last step.
    assert evals == [(0, 0.0), (3, 30.0), (6, 60.0), (8, 80.0)]
