"""``recover`` (local reconstruction, then KD, in one budget) and ``--freeze-embeddings``.

With a fake clock (a local-reconstruction step takes 2 s, a KD step 10 s) the recipe gives the
local stage its fraction of the budget, KD the rest, and stops within one KD step of the budget
with distill's complete outputs plus one metrics curve over both stages; the embedding and lm_head
of a student trained with --freeze-embeddings do not move while its layers do."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import distill, history, setup  # noqa: F401  (setup is the module fixture)

from pangu_light.frontend.distill import budget, local, loop
from pangu_light.frontend.reimport import reimport
from pangu_light.frontend.student import load_student
from pangu_light.tools.cli import main

LOCAL_STEP, KD_STEP = 2.0, 10.0


@pytest.fixture
def fake_clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    train_step, loss = loop._Run.train_step, local._loss

    def kd_step(self, step):
        now[0] += KD_STEP
        return train_step(self, step)

    def local_step(*args):
        now[0] += LOCAL_STEP
        return loss(*args)

    monkeypatch.setattr(loop._Run, "train_step", kd_step)
    monkeypatch.setattr(local, "_loss", local_step)
    return now


@pytest.mark.slow
def test_recover_stops_within_one_step_of_the_budget(setup, tmp_path, fake_clock):  # noqa: F811
    out = tmp_path / "recover"
    assert main([
        "recover", str(setup / "per_layer.onnx"), "--teacher", str(setup / "teacher"), "-o", str(out),
        "--data", str(setup / "text.txt"), "--seq-len", "32", "--eval-samples", "8", "--quiet",
        "--time-budget", "60s", "--local-fraction", "0.3", "--local-samples", "16", "--train-samples", "64",
        "--eval-every", "2", "--plot-axis", "seconds",
    ]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rec = summary["recover"]
    # Local: 18 s for 3 layers, 6 s each = 3 steps of 2 s per layer; KD: the 42 s left = 4 steps of 10 s.
    assert [layer["steps"] for layer in rec["layers"]] == [3, 3, 3] and rec["local_s"] == 18.0
    assert summary["stopped"] == "time_budget" and summary["steps"] == 4 and summary["train_s"] == 40.0
    assert 60.0 - KD_STEP < rec["total_s"] <= 60.0
    # distill's complete outputs: checkpoint, model directory, re-exported graph, curves.
    assert (out / "checkpoints" / "step-000004.pt").is_file() and (out / "distilled.onnx").is_file()
    assert summary["export_max_abs_diff"] <= 1e-4 and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model = load_student(out / "model")
    assert len(model.model.layers) == 3
    # One curve over both stages: held-out perplexity against elapsed seconds and tokens.
    entries = history(out)
    evals = [(h["stage"], h["elapsed_s"], h["tokens"]) for h in entries if "eval_perplexity" in h]
    assert evals[0] == ("local", 0.0, 0) and evals[1] == ("kd", 18.0, 16 * 32)
    assert [e[1] for e in evals] == sorted(e[1] for e in evals) and evals[-1][1] == 58.0
    assert evals[-1][2] == 16 * 32 + 4 * 4 * 32
    # The KD stage started from the reconstructed weights: its first held-out KL is the local stage's end.
    kl = [h["eval_kl"] for h in entries if "eval_kl" in h]
    assert kl[1] < kl[0]


def test_local_stage_stops_training_layers_when_its_budget_is_spent(setup, tmp_path, fake_clock):  # noqa: F811
    import transformers

    from pangu_light.frontend.distill.local import LocalConfig, reconstruct

    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(setup / "teacher")).eval()
    student = reimport(setup / "per_layer.onnx")
    windows = np.random.default_rng(0).integers(3, 100, size=(12, 16))
    result = reconstruct(student.model, teacher, LocalConfig(
        windows[:8], windows[8:], tmp_path, student.spec.origin, time_budget=3.0, bf16=False, quiet=True))
    # Layer 0 may use 1 s and takes its one step (2 s); layer 1 gets (3 - 2) / 2 s, one step; 4 s >= 3 s: layer 2 waits.
    assert [layer["steps"] for layer in result.layers] == [1, 1, 0] and result.elapsed_s == 4.0
    assert result.layers[2]["error_start"] is None


@pytest.mark.slow
def test_frozen_embeddings_do_not_move(setup, tmp_path):  # noqa: F811
    out = tmp_path / "frozen"
    assert distill(setup, "per_layer.onnx", out, "--steps", "3", "--lr", "1e-2", "--train-samples", "16",
                   "--no-export", "--freeze-embeddings") == 0
    before = reimport(setup / "per_layer.onnx").model
    after = load_student(out / "model")
    assert torch.equal(after.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert torch.equal(after.lm_head.weight, before.lm_head.weight)
    down = [m.model.layers[0].mlp.down_proj.weight.detach() for m in (after, before)]
    moved = (down[0] - down[1]).abs().max()
    assert float(moved) > 1e-4  # lr 1e-2 for 3 steps: the layers did train
    # A sliced hidden size is refused, naming the option.
    assert distill(setup, "uniform.onnx", tmp_path / "sliced", "--steps", "1", "--freeze-embeddings") == 2


@pytest.mark.slow
def test_recover_reuses_its_modules_and_computes_what_separate_runs_do(setup, tmp_path):  # noqa: F811
    """recover's KD stage trains the module its local stage left, with the teacher already loaded,
    and exports that module: the same weights, losses and graph as a separate distill run (fresh
    re-import, teacher loaded again, the final graph from a re-import) started from local/weights.pt;
    every metrics entry carries wall and CPU seconds and tokens, none decreasing."""
    import argparse
    import dataclasses

    from pangu_light.frontend.distill import distill as run_distill
    from pangu_light.tools import recover_cmd
    from pangu_light.tools.distill_options import config_from_args

    from reference import left_padded_batch, max_diff_on_tokens, ort_logits

    argv = [str(setup / "per_layer.onnx"), "--teacher", str(setup / "teacher"), "-o", str(tmp_path / "recover"),
            "--data", str(setup / "text.txt"), "--seq-len", "32", "--eval-samples", "8", "--quiet",
            "--steps", "3", "--lr", "1e-3", "--eval-every", "2", "--local-samples", "8", "--local-steps", "2",
            "--train-samples", "32", "--local-lr", "1e-3", "--threads", "1"]
    assert main(["recover", *argv]) == 0
    out = tmp_path / "recover"
    parser = argparse.ArgumentParser()
    recover_cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    config, _ = config_from_args(args, setup / "per_layer.onnx", tmp_path / "separate", time_budget=None)
    config = dataclasses.replace(config, init_weights=out / "local" / "weights.pt")
    run_distill(config)
    separate = tmp_path / "separate"
    a = torch.load(out / "checkpoints" / "step-000003.pt", weights_only=False)["model"]
    b = torch.load(separate / "checkpoints" / "step-000003.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kd = [h for h in history(out) if h["stage"] == "kd"]
    alone = history(separate)
    assert [h.get("loss", h.get("eval_kl")) for h in kd] == [h.get("loss", h.get("eval_kl")) for h in alone]
    ids, mask = left_padded_batch(160)
    assert max_diff_on_tokens(ort_logits(out / "distilled.onnx", ids, mask),
                              ort_logits(separate / "distilled.onnx", ids, mask), mask) == 0.0
    # The clocks of a curve: every entry has them, in order; the set-up's stages are timed.
    entries = history(out)
    for key in ("wall_s", "cpu_s", "tokens", "elapsed_s"):
        values = [h[key] for h in entries]
        assert values == sorted(values), key
    assert entries[-1]["cpu_s"] > 0 and entries[-1]["wall_s"] >= entries[0]["wall_s"]
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert {"reimport", "teacher_load", "local_capture", "teacher_cache", "eval_teacher", "export"} <= set(stages)
