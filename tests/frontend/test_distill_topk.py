"""Top-k distillation (``frontend.kd_topk``): with k = V it is the full-vocabulary loss (value and
gradients), with small k it under-estimates the full KL by exactly P KL(p~ || q~) and by no more
than the bound of the module docstring, on random logits at several temperatures; the fused
kernel equals its plain autograd version; the top-k cache holds the teacher's top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_distill import distill, history, setup  # noqa: F401  (setup is the module fixture)

from pangu_light.frontend.kd_loss import KDLossOptions, fused_kd_loss
from pangu_light.frontend.kd_topk import (
    fused_topk_kd_loss,
    reference_topk_kd_loss,
    teacher_topk,
    topk_error_bound,
)
from pangu_light.frontend.teacher_cache import TopKCache

from families import tiny_model

VOCAB = 90


def problem(n: int, seed: int, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, 12, generator=generator, requires_grad=True)
    w_s = (torch.randn(VOCAB, 12, generator=generator) * 0.7).requires_grad_()
    h_t, w_t = torch.randn(n, 20, generator=generator) * scale, torch.randn(VOCAB, 20, generator=generator)
    targets = torch.randint(0, VOCAB, (n,), generator=generator)
    targets[[3, -1]] = -100
    return h_s, w_s, h_t, w_t, targets


@pytest.mark.parametrize(
    "options",
    [KDLossOptions(chunk=7), KDLossOptions(temperature=2.0, ce_weight=0.3, chunk=16),
     KDLossOptions(temperature=0.5, student_softcap=3.0, chunk=100)],
    ids=["kl", "temperature+ce", "softcapped"],
)
def test_k_equal_to_the_vocabulary_is_full_kd(options):
    h_s, w_s, h_t, w_t, targets = problem(41, 0)
    full = fused_kd_loss(h_s, w_s, h_t, w_t, targets, options)
    full_grads = torch.autograd.grad(full[0], [h_s, w_s])
    teacher = teacher_topk(h_t @ w_t.T, VOCAB, options.temperature)
    assert float(teacher.tail.abs().max()) == 0.0
    got = fused_topk_kd_loss(h_s, w_s, teacher, targets, options)
    grads = torch.autograd.grad(got[0], [h_s, w_s])
    assert float(full[1]) > 0.1
    for a, b in zip(got, full):  # loss, KL, CE
        a, b = a.detach(), b.detach()
        assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b))
    for a, b in zip(grads, full_grads):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


@pytest.mark.parametrize("k", [1, 5, 30])
@pytest.mark.parametrize("options", [KDLossOptions(chunk=9), KDLossOptions(temperature=2.0, ce_weight=0.4, chunk=50)],
                         ids=["kl", "temperature+ce"])
def test_fused_topk_equals_autograd(k, options):
    h_s, w_s, h_t, w_t, targets = problem(41, 1)
    teacher = teacher_topk(h_t @ w_t.T, k, options.temperature)
    got = fused_topk_kd_loss(h_s, w_s, teacher, targets, options)
    grads = torch.autograd.grad(got[0], [h_s, w_s])
    expected = reference_topk_kd_loss(h_s, w_s, teacher, targets, options)
    expected_grads = torch.autograd.grad(expected[0], [h_s, w_s])
    for a, b in zip(got, expected):
        a, b = a.detach(), b.detach()
        assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b)) + 1e-7
    for a, b in zip(grads, expected_grads):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0], ids=["flat", "peaked", "sharp"])
def test_small_k_error_is_bounded_by_the_tail_mass(temperature, scale):
    """Per position: KL - KL_k = P KL(p~ || q~) (the chain rule), and 0 <= it <= the bound."""
    n = 64
    h_s, w_s, h_t, w_t, targets = problem(n, 2, scale)
    z_s, z_t = (h_s @ w_s.T).detach().double(), (h_t @ w_t.T).double()
    log_p, log_q = torch.log_softmax(z_t / temperature, -1), torch.log_softmax(z_s / temperature, -1)
    full_rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    largest = 0.0
    for k in (1, 4, 16, 60):
        teacher = teacher_topk(z_t, k, temperature)
        options = KDLossOptions(temperature=temperature, chunk=16)
        rows = []
        for i in range(n):  # per-row KL_k from the kernel (its KL is T^2 times the row mean)
            one = type(teacher)(teacher.log_p[i:i + 1], teacher.index[i:i + 1], teacher.tail[i:i + 1])
            kl = fused_topk_kd_loss(h_s[i:i + 1].detach(), w_s.detach(), one, targets[i:i + 1], options)[1]
            rows.append(float(kl) / temperature**2)
        error = full_rows - torch.tensor(rows, dtype=torch.float64)
        # The exact defect: P KL(p~ || q~), p~ and q~ the tails renormalised.
        tail = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, teacher.index, False)
        lp_t = torch.where(tail, log_p, -torch.inf)
        lq_t = torch.where(tail, log_q, -torch.inf)
        lp_t, lq_t = lp_t - torch.logsumexp(lp_t, -1, keepdim=True), lq_t - torch.logsumexp(lq_t, -1, keepdim=True)
        defect = teacher.tail.double() * torch.where(tail, lp_t.exp() * (lp_t - lq_t), 0.0).sum(-1)
        bound = topk_error_bound(z_s, z_t, teacher, temperature).double()
        # The kernel's KL rows are float32 sums of p (log p - log q) with |log p| up to ~10: ~1e-6 absolute.
        slack = 2e-6 * full_rows.abs() + 2e-6
        assert bool(((error - defect).abs() <= slack).all())
        assert bool((error >= -slack).all())
        assert bool((error <= bound + slack).all())
        largest = max(largest, float((defect / slack).max()))
    assert largest > 100  # some k leaves a defect far above the rounding: the checks are not vacuous


def test_topk_cache_holds_the_teachers_top_k(tmp_path):
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.model.norm.weight.mul_(20.0)
    ids = torch.randint(3, 160, (3, 11), generator=torch.Generator().manual_seed(0))
    cache = TopKCache.open_or_build(tmp_path, teacher=teacher, identity="t", windows=ids.numpy(), k=8,
                                    temperature=2.0, batch_size=2, quiet=True)
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits.reshape(-1, 160)
    expected = teacher_topk(logits, 8, 2.0)
    got = cache[np.arange(3)]
    assert torch.equal(got.index.reshape(-1, 8), expected.index)
    assert float((got.log_p.reshape(-1, 8) - expected.log_p).abs().max()) <= 1e-5
    assert float((got.tail.reshape(-1) - expected.tail).abs().max()) <= 1e-6
    assert float(expected.tail.max()) > 1e-3
    # The same teacher and windows reuse the file; another k or temperature builds another.
    again = TopKCache.open_or_build(tmp_path, teacher=None, identity="t", windows=ids.numpy(), k=8,
                                    temperature=2.0, build=False)
    assert again.path == cache.path
    other = TopKCache.open_or_build(tmp_path, teacher=teacher, identity="t", windows=ids.numpy(), k=8,
                                    temperature=1.0, quiet=True)
    assert other.path != cache.path


@pytest.mark.slow
def test_topk_distillation_run(setup, tmp_path):  # noqa: F811
    """--kd topk trains (the held-out KL, always the full one, falls), and the online teacher gives
    the cached top-k's losses."""
    common = ["--kd", "topk", "--top-k", "8", "--steps", "6", "--lr", "1e-3", "--eval-every", "3",
              "--train-samples", "24", "--no-export"]
    assert distill(setup, "uniform.onnx", tmp_path / "cached", *common) == 0
    assert distill(setup, "uniform.onnx", tmp_path / "online", *common, "--online-teacher") == 0
    cached, online = history(tmp_path / "cached"), history(tmp_path / "online")
    evals = [h["eval_kl"] for h in cached if "eval_kl" in h]
    assert evals[-1] < 0.8 * evals[0]
    train = [h for h in cached if "loss" in h]
    assert all(h["loss"] > 0 for h in train)
    for a, b in zip(cached, online):
        for key in ("loss", "eval_kl"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key])
    assert list((tmp_path / "cached" / "teacher_cache").glob("teacher-topk-*.tail.npy"))
