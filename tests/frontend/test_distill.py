"""Distillation: the fused KL equals autograd's, the cached teacher equals the online one, a short
run lowers the held-out KL, a resumed run continues the same curve, and the outputs (a plain HF
directory for a uniform student, per-layer otherwise, and the re-exported graph) compute what
the distilled student computes.

The teacher is a tiny Llama with a character tokenizer (99 ids within its vocabulary of 160)
whose final norm is scaled by 20, so its next-token distributions are far from uniform and the
pruned student has something to learn."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from pangu_light.frontend.distill import lr_factor, schedule_windows
from pangu_light.frontend.kd_loss import KDLossOptions, fused_kd_loss, reference_kd_loss
from pangu_light.frontend.reimport import reimport
from pangu_light.frontend.student import STUDENT_FILE, load_student
from pangu_light.frontend.teacher_cache import TeacherCache, teacher_hidden
from pangu_light.tools.cli import main

from families import tiny_model
from reference import (
    compile_graph,
    left_padded_batch,
    max_diff_on_tokens,
    ort_logits,
    save_char_tokenizer,
    torch_logits,
)

UNIFORM = "prune-heads{per_group=1},prune-ffn{keep_first=48},slice-hidden{keep_first=48},slnp"
# Logits of magnitude ~4 after training: ORT vs PyTorch measured 3.8e-6 (float32 rounding).
TOLERANCE = 1e-5
PER_LAYER = "prune-kv-groups{keep=[[0,1],[1],[0,1],[0]]},prune-ffn{keep_first=40},drop-layers{layers=[2]}"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teacher directory, its exported graph, a uniform and a per-layer pruned graph, a corpus."""
    from pangu_light.calib.corpora import load_documents

    root = tmp_path_factory.mktemp("distill")
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.model.norm.weight.mul_(20.0)
    teacher.save_pretrained(root / "teacher")
    save_char_tokenizer(root / "teacher")
    assert main(["export", str(root / "teacher"), "-o", str(root / "orig.onnx"), "--quiet"]) == 0
    compile_graph(root / "orig.onnx", UNIFORM, root / "uniform.onnx")
    compile_graph(root / "orig.onnx", PER_LAYER, root / "per_layer.onnx")
    # Twelve Wikipedia articles; their paragraphs are the documents of the calib/eval split.
    (root / "text.txt").write_text("\n\n".join(load_documents("wiki")[:12]))
    return root


def distill(setup, graph: str, out, *extra: str) -> int:
    return main([
        "distill", str(setup / graph), "--teacher", str(setup / "teacher"), "-o", str(out),
        "--data", str(setup / "text.txt"), "--seq-len", "32", "--eval-samples", "16", "--quiet", *extra,
    ])


def history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize(
    "options, n",
    [
        (KDLossOptions(chunk=7), 41),
        (KDLossOptions(temperature=2.0, ce_weight=0.3, chunk=16), 41),
        (KDLossOptions(temperature=0.5, ce_weight=1.0, student_softcap=3.0, teacher_softcap=4.0, chunk=100), 41),
        (KDLossOptions(chunk=300), 2500),  # several blocks of dL/dW_s rows (GRAD_BLOCK_ROWS = 1024)
    ],
    ids=["kl", "temperature+ce", "softcapped", "blocks"],
)
def test_fused_loss_equals_autograd(options, n):
    generator = torch.Generator().manual_seed(0)
    hs, ht, vocab = 12, 20, 90
    h_s = torch.randn(n, hs, generator=generator, requires_grad=True)
    w_s = (torch.randn(vocab, hs, generator=generator) * 0.7).requires_grad_()
    h_t, w_t = torch.randn(n, ht, generator=generator), torch.randn(vocab, ht, generator=generator)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[[3, 17, -1]] = -100
    got = fused_kd_loss(h_s, w_s, h_t, w_t, targets, options)
    got = [got[0], got[1], got[2]]
    grads = torch.autograd.grad(got[0] * 1.5, [h_s, w_s])
    expected = reference_kd_loss(h_s, w_s, h_t, w_t, targets, options)
    expected_grads = torch.autograd.grad(expected[0] * 1.5, [h_s, w_s])
    for a, b in zip(got, expected):
        a, b = a.detach(), b.detach()
        assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b)) + 1e-6
    assert float(got[0].detach()) > 0.1
    for a, b in zip(grads, expected_grads):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


@pytest.mark.parametrize("options", [KDLossOptions(chunk=7), KDLossOptions(temperature=2.0, ce_weight=0.3, chunk=16)])
def test_no_grad_gives_the_same_loss_without_computing_gradients(options, monkeypatch):
    """Held-out evaluation runs under no_grad: the same (loss, kl, ce), and none of the gradient
    matmuls (dL/dh_s per chunk, dL/dW_s per block) that a training step needs."""
    generator = torch.Generator().manual_seed(2)
    h_s = torch.randn(41, 12, generator=generator, requires_grad=True)
    w_s = (torch.randn(90, 12, generator=generator) * 0.7).requires_grad_()
    h_t, w_t = torch.randn(41, 20, generator=generator), torch.randn(90, 20, generator=generator)
    targets = torch.randint(0, 90, (41,), generator=generator)
    calls, mm = [0], torch.mm

    def counted(*args, **kwargs):
        calls[0] += 1
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", counted)
    training = fused_kd_loss(h_s, w_s, h_t, w_t, targets, options)
    training_calls, calls[0] = calls[0], 0
    with torch.no_grad():
        evaluating = fused_kd_loss(h_s, w_s, h_t, w_t, targets, options)
    chunks = -(-41 // options.chunk)
    assert training_calls - calls[0] == chunks + 1  # one dL/dh_s per chunk, one dL/dW_s block
    for a, b in zip(training, evaluating):
        assert abs(float(a.detach()) - float(b)) <= 1e-6 * abs(float(b)) + 1e-7


def test_bfloat16_matmuls_stay_close():
    generator = torch.Generator().manual_seed(1)
    h_s, w_s = torch.randn(64, 32, generator=generator), torch.randn(300, 32, generator=generator) * 0.3
    h_t, w_t = torch.randn(64, 32, generator=generator), torch.randn(300, 32, generator=generator) * 0.3
    targets = torch.randint(0, 300, (64,), generator=generator)
    exact = fused_kd_loss(h_s, w_s, h_t, w_t, targets)[0]
    fast = fused_kd_loss(h_s, w_s, h_t, w_t, targets, KDLossOptions(matmul_dtype=torch.bfloat16))[0]
    assert abs(float(fast) - float(exact)) <= 0.02 * float(exact)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_hidden_states_give_the_teacher_logits(family, tmp_path):
    """logits = cap(h W^T) from the cached final hidden states is what the teacher computes
    (Gemma2 soft-caps its logits at 30)."""
    teacher = tiny_model(family)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(40.0)  # logits large enough for the soft-cap to matter
    ids = torch.randint(3, 160, (3, 11), generator=torch.Generator().manual_seed(0))
    cache = TeacherCache.open_or_build(tmp_path, teacher=teacher, identity="t", windows=ids.numpy(), batch_size=3,
                                       quiet=True)
    assert torch.equal(cache[np.arange(3)], teacher_hidden(teacher, ids))
    options = KDLossOptions(teacher_softcap=getattr(teacher.config, "final_logit_softcapping", None))
    z = cache[np.arange(3)] @ teacher.lm_head.weight.detach().T
    if options.teacher_softcap:
        z = options.teacher_softcap * torch.tanh(z / options.teacher_softcap)
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits
    assert float(expected.abs().max()) > 5.0
    assert float((z - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    # The loss of the teacher against itself through the cache is zero.
    h = cache[np.arange(3)].reshape(-1, 64)
    loss = fused_kd_loss(h, teacher.lm_head.weight.detach(), h, teacher.lm_head.weight.detach(),
                         torch.full((33,), -100),
                         dataclasses.replace(options, student_softcap=options.teacher_softcap))[0]
    assert abs(float(loss)) <= 1e-6
    # A second open reuses the file; other windows get another one.
    again = TeacherCache.open_or_build(tmp_path, teacher=None, identity="t", windows=ids.numpy(), build=False)
    assert again.path == cache.path
    other = TeacherCache.open_or_build(tmp_path, teacher=teacher, identity="t", windows=ids.numpy()[::-1].copy(),
                                       quiet=True)
    assert other.path != cache.path


def test_data_order_and_schedule():
    first = schedule_windows(10, seed=3, start=0, count=25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:20])  # a new order each epoch
    pieces = np.concatenate([schedule_windows(10, 3, s, 5) for s in range(0, 25, 5)])
    assert np.array_equal(pieces, first)
    assert not np.array_equal(schedule_windows(10, seed=4, start=0, count=10), first[:10])
    assert lr_factor(0, 100, 0, 0.1) == 1.0 and abs(lr_factor(100, 100, 0, 0.1) - 0.1) < 1e-12
    assert abs(lr_factor(50, 100, 0, 0.1) - 0.55) < 1e-12
    assert lr_factor(0, 100, 10, 0.1) == 0.1 and lr_factor(9, 100, 10, 0.1) == 1.0


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_distillation_lowers_held_out_kl_and_exports_a_plain_hf_model(setup, tmp_path):
    out = tmp_path / "run"
    assert distill(setup, "uniform.onnx", out, "--steps", "24", "--lr", "1e-3", "--eval-every", "8") == 0
    evals = [h for h in history(out) if "eval_kl" in h]
    assert [h["step"] for h in evals] == [0, 8, 16, 24]
    assert evals[-1]["eval_kl"] < 0.6 * evals[0]["eval_kl"]  # measured: 1.31 -> 0.41
    assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000024.pt"]
    # A uniform student is a standard HF directory: plain from_pretrained, no custom code.
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    assert (plain.config.hidden_size, plain.config.num_attention_heads, plain.config.intermediate_size) == (48, 2, 48)
    ids, mask = left_padded_batch(160)
    distilled = torch_logits(plain, ids, mask)
    original = torch_logits(reimport(setup / "uniform.onnx").model, ids, mask)
    assert max_diff_on_tokens(distilled, original, mask) > 1e-2  # the weights did change
    assert max_diff_on_tokens(ort_logits(out / "distilled.onnx", ids, mask), distilled, mask) <= TOLERANCE
    assert max_diff_on_tokens(torch_logits(reimport(out / "distilled.onnx").model, ids, mask), distilled,
                              mask) <= TOLERANCE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_format"] == "hf" and summary["export_max_abs_diff"] <= 1e-4
    # A finished run is not overwritten by accident.
    assert distill(setup, "uniform.onnx", out, "--steps", "24") == 2


@pytest.mark.slow
def test_resume_continues_the_same_curve(setup, tmp_path):
    cache = ["--teacher-cache", str(tmp_path / "cache"), "--no-export", "--lr", "1e-3", "--eval-every", "100"]
    full = tmp_path / "full"
    assert distill(setup, "per_layer.onnx", full, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "5",
                   *cache) == 0
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step-000002.pt", resumed / "checkpoints")
    assert distill(setup, "per_layer.onnx", resumed, "--steps", "4", "--save-every", "2", "--resume", *cache) == 0
    a = {h["step"]: h for h in history(full) if "loss" in h}
    b = {h["step"]: h for h in history(resumed) if "loss" in h}
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6
    assert a[3]["loss"] != a[2]["loss"]
    state_a = torch.load(full / "checkpoints" / "step-000004.pt", weights_only=False)["model"]
    state_b = torch.load(resumed / "checkpoints" / "step-000004.pt", weights_only=False)["model"]
    assert max(float((state_a[k] - state_b[k]).abs().max()) for k in state_a) <= 1e-6
    # Other settings are refused.
    assert distill(setup, "per_layer.onnx", resumed, "--steps", "6", "--resume", *cache) == 2


@pytest.mark.slow
def test_online_teacher_and_per_layer_output(setup, tmp_path):
    """The online teacher gives the losses of the cached one; a per-layer student is written
    for load_student, and the re-exported graph computes what it computes."""
    common = ["--steps", "2", "--lr", "1e-3", "--eval-every", "100"]
    assert distill(setup, "per_layer.onnx", tmp_path / "cached", *common) == 0
    assert distill(setup, "per_layer.onnx", tmp_path / "online", *common, "--online-teacher", "--no-export") == 0
    cached, online = history(tmp_path / "cached"), history(tmp_path / "online")
    for a, b in zip(cached, online):
        for key in ("loss", "eval_kl"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6
    out = tmp_path / "cached"
    assert (out / "model" / STUDENT_FILE).is_file() and not (out / "model" / "config.json").exists()
    student = load_student(out / "model")
    assert [l.self_attn.k_proj.out_features // 16 for l in student.model.layers] == [2, 1, 1]
    ids, mask = left_padded_batch(160)
    expected = torch_logits(student, ids, mask)
    assert max_diff_on_tokens(ort_logits(out / "distilled.onnx", ids, mask), expected, mask) <= TOLERANCE
    assert (out / "model" / "tokenizer.json").is_file()


def test_bad_inputs_are_one_clear_line(setup, tmp_path, capsys):
    other = tiny_model("qwen2")
    other.config.vocab_size = 200
    transformers.AutoModelForCausalLM.from_config(other.config).save_pretrained(tmp_path / "wrong")
    assert main(["distill", str(setup / "uniform.onnx"), "--teacher", str(tmp_path / "wrong"), "-o",
                 str(tmp_path / "o"), "--data", str(setup / "text.txt"), "--seq-len", "32", "--steps", "1",
                 "--quiet"]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert distill(setup, "uniform.onnx", tmp_path / "o2", "--steps", "1", "--ce-weight", "2") == 2
    assert "--ce-weight" in capsys.readouterr().err
    assert distill(setup, "uniform.onnx", tmp_path / "o3", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
