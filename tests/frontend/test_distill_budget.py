"""``distill --time-budget``: with a fake clock (each training step takes 10 s), the run stops after
the last step that fits, within one step of the budget, writes complete outputs (checkpoint, HF
directory, re-exported graph, a summary saying why it stopped), stamps every metrics entry with
elapsed seconds, and moves the learning-rate cosine with the clock; a budget shorter than one
step still trains one step and writes a valid output."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_distill import distill, history, setup  # noqa: F401  (setup is the module fixture)

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.distill import budget, loop
from pangu_light.frontend.distill.budget import parse_duration
from pangu_light.frontend.distill.schedule import lr_factor

STEP_SECONDS = 10.0


@pytest.fixture
def fake_clock(monkeypatch):
    """Time stands still except during a training step, which takes STEP_SECONDS."""
    now = [1000.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    original = loop._Run.train_step

    def train_step(self, step):
        now[0] += STEP_SECONDS
        return original(self, step)

    monkeypatch.setattr(loop._Run, "train_step", train_step)
    return now


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    for bad in ("abc", "0m", "5d", "-3s"):
        with pytest.raises(PanguLightError, match="time-budget"):
            parse_duration(bad)


@pytest.mark.slow
def test_stops_within_one_step_of_the_budget(setup, tmp_path, fake_clock):  # noqa: F811
    out = tmp_path / "run"
    assert distill(setup, "uniform.onnx", out, "--time-budget", "35s", "--steps", "100", "--train-samples", "16",
                   "--lr", "1e-3", "--eval-every", "2", "--plot-axis", "seconds", "--warmup", "0") == 0
    summary = json.loads((out / "summary.json").read_text())
    # 3 steps end at 30 s; a 4th would end at 40 s > 35 s.
    assert summary["stopped"] == "time_budget" and summary["steps"] == 3 and summary["max_steps"] == 100
    assert summary["time_budget_s"] == 35.0 and summary["train_s"] == 30.0
    assert 35.0 - STEP_SECONDS < summary["train_s"] <= 35.0
    entries = history(out)
    train = [h for h in entries if "loss" in h]
    assert [h["step"] for h in train] == [1, 2, 3] and [h["elapsed_s"] for h in train] == [10.0, 20.0, 30.0]
    evals = [(h["step"], h["elapsed_s"]) for h in entries if "eval_kl" in h]
    assert evals == [(0, 0.0), (2, 20.0), (3, 30.0)]  # the last step taken is evaluated
    # The cosine follows the clock: step s + 1 runs at the factor for (s, elapsed after step s / budget).
    for before, entry in zip(train, train[1:]):
        expected = 1e-3 * lr_factor(before["step"], 100, 0, 0.1, before["elapsed_s"] / 35.0)
        assert abs(entry["lr"] - expected) <= 1e-12
    assert train[-1]["lr"] < 0.75e-3  # step-counted, it would still be 0.9998e-3
    # Complete outputs: the checkpoint of the last step, a plain HF directory, the re-exported graph.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003.pt"]
    assert torch.load(out / "checkpoints" / "step-000003.pt", weights_only=False)["step"] == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert model.config.hidden_size == 48
    assert (out / "distilled.onnx").is_file() and summary["export_max_abs_diff"] <= 1e-4
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_budget_shorter_than_one_step_trains_one(setup, tmp_path, fake_clock):  # noqa: F811
    out = tmp_path / "short"
    assert distill(setup, "uniform.onnx", out, "--time-budget", "1s", "--no-export", "--train-samples", "16") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "time_budget" and summary["steps"] == 1 and summary["train_s"] == STEP_SECONDS
    assert (out / "checkpoints" / "step-000001.pt").is_file() and (out / "model" / "config.json").is_file()
    # Without --steps/--tokens the cap is one pass over the training windows (16 / 4 per step).
    assert summary["max_steps"] == 4


@pytest.mark.slow
def test_a_budgeted_run_caches_only_what_it_reaches(setup, tmp_path, fake_clock, monkeypatch):  # noqa: F811
    """Under a budget the teacher cache grows by CHUNK_STEPS steps' windows just before a step needs
    them, its time not counted (here a chunk takes 100 s of the fake clock); the losses are those
    of a run whose whole cache was built in its set-up (a constant learning rate, so that the
    budget's clock-driven cosine does not differ, and no warm-up, which counts time under a budget)."""
    import numpy as np

    from pangu_light.frontend.distill import data
    from pangu_light.frontend.teacher_cache import TeacherCache

    monkeypatch.setattr(data, "CHUNK_STEPS", 2)
    build = TeacherCache._build

    def slow_build(*args, **kwargs):
        fake_clock[0] += 100.0
        return build(*args, **kwargs)

    monkeypatch.setattr(TeacherCache, "_build", staticmethod(slow_build))
    cache = tmp_path / "cache"
    out = tmp_path / "budget"
    # 64 windows would be 16 steps; 35 s of 10 s steps takes 3: chunks of 2 steps x 4 windows.
    assert distill(setup, "uniform.onnx", out, "--time-budget", "35s", "--train-samples", "64", "--lr", "1e-3",
                   "--min-lr-ratio", "1", "--teacher-cache", str(cache), "--no-export", "--eval-every", "100",
                   "--warmup", "0") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_s"] == 30.0 and summary["max_steps"] == 16
    sizes = sorted(np.load(p, mmap_mode="r").shape[0] for p in cache.glob("teacher-*.npy"))
    assert sizes == [8, 8]  # steps 1-2 and 3-4: 16 of the 64 windows
    assert summary["stages"]["teacher_cache"]["wall_s"] > 0
    whole = tmp_path / "whole"
    assert distill(setup, "uniform.onnx", whole, "--steps", "3", "--train-samples", "64", "--lr", "1e-3",
                   "--min-lr-ratio", "1", "--no-export", "--eval-every", "100", "--warmup", "0") == 0
    a = [h["loss"] for h in history(out) if "loss" in h]
    b = [h["loss"] for h in history(whole) if "loss" in h]
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
