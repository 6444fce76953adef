"""The learning-rate schedule of ``distill``: the warm-up starts small, rises without falling, reaches
the peak where it ends (in steps, or under a time budget at the later of its steps and its share of
the budget), then the cosine decays to min_lr_ratio; no warm-up is the old schedule; ``--warmup``
parses steps or a fraction; a budgeted run records each step's warm-up factor and where it ended."""

from __future__ import annotations

import json
import math

import pytest
from test_distill import distill, history, setup  # noqa: F401  (setup is the module fixture)
from test_distill_budget import STEP_SECONDS, fake_clock  # noqa: F401  (fixture)

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.distill.schedule import (
    MIN_WARMUP_STEPS,
    lr_factor,
    parse_warmup,
    warmup_factor,
    warmup_steps,
)


def _cosine(progress: float, r: float) -> float:
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))


def test_parse_warmup():
    assert parse_warmup("20") == (20, 0.0) and parse_warmup("0") == (0, 0.0)
    assert parse_warmup("0.1") == (MIN_WARMUP_STEPS, 0.1) and parse_warmup(" .25 ") == (MIN_WARMUP_STEPS, 0.25)
    for bad in ("1.0", "1.5", "-1", "abc", "", "0.0", "2.5"):
        with pytest.raises(PanguLightError, match="--warmup"):
            parse_warmup(bad)


def test_step_warmup_starts_small_and_reaches_the_peak_at_its_end():
    # 100 steps, a tenth of them (10 > 4 steps) warm up.
    assert warmup_steps(100, 4, 0.1) == 10
    factors = [lr_factor(s, 100, 4, 0.1, None, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)  # lr / 10 at step 0
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[9] == 1.0  # the peak at the warm-up's last step
    assert all(b <= a for a, b in zip(factors[9:], factors[10:]))  # then only decays
    assert factors[10 + 45] == pytest.approx(_cosine(0.5, 0.1))  # half-way through the cosine
    assert lr_factor(100, 100, 4, 0.1, None, 0.1) == pytest.approx(0.1)
    # A short run: at least MIN_WARMUP_STEPS, never more than the run.
    assert warmup_steps(20, 4, 0.1) == 4 and warmup_steps(3, 4, 0.1) == 3 and warmup_steps(1, 4, 0.1) == 1
    assert [lr_factor(s, 3, 4, 0.1, None, 0.1) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # Steps alone (--warmup 20), and no warm-up: the schedule of old.
    assert lr_factor(0, 100, 20, 0.1) == 0.05 and lr_factor(19, 100, 20, 0.1) == 1.0
    assert lr_factor(0, 100, 0, 0.1) == 1.0 and lr_factor(50, 100, 0, 0.1) == pytest.approx(0.55)


@pytest.mark.parametrize("step_fraction", [0.001, 0.02, 0.3], ids=["fast-steps", "medium", "slow-steps"])
def test_budgeted_warmup_rises_to_the_peak_at_the_later_of_its_steps_and_its_time(step_fraction):
    """Each step takes ``step_fraction`` of the budget; W = 4 steps, F = 0.1 of the budget."""
    W, F, r, cap = 4, 0.1, 0.1, 100_000
    factors, warms, spent = [], [], []
    for s in range(int(1 / step_fraction) + 1):
        t = min(s * step_fraction, 1.0)  # the budget's fraction when step s starts
        spent.append(t)
        factors.append(lr_factor(s, cap, W, r, t, F))
        warms.append(warmup_factor(s, cap, W, t, F))
    assert factors[0] == pytest.approx(1 / W)  # small at step 0, whatever the step's speed
    end = next(s for s, w in enumerate(warms) if w >= 1.0)
    time_end = next(s for s in range(len(spent)) if spent[s] >= F)
    assert end == max(W - 1, time_end)  # the later of W steps and F of the budget
    assert end == {0.001: 100, 0.02: 5, 0.3: W - 1}[step_fraction]
    assert all(b >= a for a, b in zip(warms[:end + 1], warms[1:end + 1]))  # never falls during the warm-up
    for s in range(end):
        assert warms[s] == pytest.approx(min((s + 1) / W, max(1 / W, spent[s] / F)))
    # The cosine starts at F of the budget (or W of the cap): at the warm-up's end, its value there.
    progress = max((end - W) / (cap - W), max(spent[end] - F, 0.0) / (1 - F))
    assert factors[end] == pytest.approx(_cosine(progress, r))
    if end == time_end:
        assert factors[end] > 0.999  # a run of fast steps reaches the peak itself
    assert lr_factor(10**6, cap, W, r, 1.0, F) == pytest.approx(r)  # the budget's end: min_lr_ratio
    assert all(b <= a for a, b in zip(factors[end:], factors[end + 1:]))


def test_budget_without_warmup_is_the_clock_cosine_of_old():
    for s, t in ((0, 0.0), (3, 0.2), (7, 0.9)):
        assert lr_factor(s, 100, 0, 0.1, t) == pytest.approx(_cosine(max(s / 100, t), 0.1))


@pytest.mark.slow
def test_a_budgeted_run_warms_up_and_records_it(setup, tmp_path, fake_clock):  # noqa: F811
    """10 s steps under a 100 s budget, the default --warmup 0.1 (4 steps, 10 s): step s starts at
    s / 10 of the budget, so warm(s) = min(1, (s + 1) / 4, max(1/4, s)): 1/4, 1/2, 3/4, then 1 at step 4."""
    out = tmp_path / "run"
    assert distill(setup, "uniform.onnx", out, "--time-budget", "100s", "--steps", "100", "--train-samples", "16",
                   "--lr", "1e-3", "--eval-every", "100", "--no-export") == 0
    train = [h for h in history(out) if "loss" in h]
    assert [h["warmup"] for h in train[:5]] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    for s, entry in enumerate(train):
        assert entry["lr"] == pytest.approx(1e-3 * lr_factor(s, 100, 4, 0.1, s * STEP_SECONDS / 100, 0.1), abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warmup"] == {"steps": 4, "fraction": 0.1, "ended_at_step": 4}
    assert distill(setup, "uniform.onnx", tmp_path / "bad", "--warmup", "1.5", "--steps", "1") == 2
