"""Distillation loss on the full vocabulary, fused with both lm_heads and computed in row chunks.

For N token positions with student hidden states h_s [N, Hs] (after the final norm), the
student head W_s [V, Hs], teacher hidden states h_t [N, Ht] and head W_t [V, Ht]::

    z_s = cap_s(h_s W_s^T),  z_t = cap_t(h_t W_t^T)          cap(x) = c tanh(x / c) (Gemma2), else x
    p   = softmax(z_t / T),  q = softmax(z_s / T)
    KL  = T^2 / N * sum_n sum_v p (log p - log q)             (Hinton's T^2 keeps gradients O(1))
    CE  = 1 / M * sum_{n: y_n >= 0} -log softmax(z_s)[y_n]    (M targets; y = -100 is ignored)
    L   = (1 - a) KL + a CE

and its gradient with respect to the student logits, in closed form::

    dL/dz_s = (1 - a) T (q - p) / N + a (softmax(z_s) - onehot(y)) / M
    dL/dx   = dL/dz_s * (1 - tanh^2(x / c))                    x = h_s W_s^T (when capped)
    dL/dh_s = (dL/dx) W_s,     dL/dW_s = (dL/dx)^T h_s

The loss is evaluated ``chunk`` rows at a time, and the two gradients are accumulated in the
same pass (as fused linear cross-entropy kernels do), so the [N, V] logits of teacher and
student never exist whole and autograd stores nothing per position: with a 49k vocabulary
the head and the loss dominate a small student's step. The teacher's logits are recomputed
from its cached final hidden states by the one matmul with its lm_head; that is exactly what
its forward pass computes last. Matmuls run in ``matmul_dtype`` (bfloat16 is ~3x faster on
CPU); softmax, KL and CE and the accumulated gradients are float32.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["KDLossOptions", "fused_kd_loss", "reference_kd_loss"]


@dataclasses.dataclass(frozen=True)
class KDLossOptions:
    temperature: float = 1.0
    ce_weight: float = 0.0  # a: 0 is pure KL
    student_softcap: float | None = None  # Gemma2's final_logit_softcapping
    teacher_softcap: float | None = None
    chunk: int = 256  # rows per chunk
    matmul_dtype: torch.dtype = torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.mm(a.to(dtype), b.to(dtype)).float()


def _cap(x: torch.Tensor, c: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if c is None:
        return x, None
    t = torch.tanh(x / c)
    return c * t, t


def _chunk_terms(h_s, w_s_t, h_t, w_t_t, y, opts: KDLossOptions, want_grad: bool):
    """KL and CE sums over a chunk of rows, and dL/dx for those rows (unnormalised)."""
    dtype = opts.matmul_dtype
    x = _mm(h_s, w_s_t, dtype)
    z_s, tanh_s = _cap(x, opts.student_softcap)
    z_t, _ = _cap(_mm(h_t, w_t_t, dtype), opts.teacher_softcap)
    T = opts.temperature
    log_p = torch.log_softmax(z_t / T, dim=-1)
    log_q = torch.log_softmax(z_s / T, dim=-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum()
    valid = y >= 0
    log_s = log_q if T == 1.0 else torch.log_softmax(z_s, dim=-1)
    ce = -log_s[valid].gather(-1, y[valid][:, None]).sum() if bool(valid.any()) else log_s.new_zeros(())
    if not want_grad:
        return kl, ce, None, None
    return kl, ce, (log_q.exp() - p), (log_s, valid, tanh_s)


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, opts: KDLossOptions):
        n = h_s.shape[0]
        m = max(int((targets >= 0).sum()), 1)
        T, a = opts.temperature, opts.ce_weight
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w_s_t = w_s.detach().to(opts.matmul_dtype).t()
        w_t_t = w_t.detach().to(opts.matmul_dtype).t()
        w_s_c = w_s.detach().to(opts.matmul_dtype)
        grad_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device) if want else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if want else None
        kl_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
        h_s = h_s.detach()
        for start in range(0, n, opts.chunk):
            rows = slice(start, min(start + opts.chunk, n))
            y = targets[rows]
            kl, ce, q_minus_p, extra = _chunk_terms(h_s[rows], w_s_t, h_t[rows], w_t_t, y, opts, want)
            kl_sum += kl
            ce_sum += ce
            if not want:
                continue
            log_s, valid, tanh_s = extra
            g = q_minus_p * ((1.0 - a) * T / n)
            if a:
                soft = log_s.exp()
                hit = valid.nonzero().squeeze(1)
                soft[hit, y[hit]] -= 1.0
                soft[~valid] = 0.0
                g = g + soft * (a / m)
            if tanh_s is not None:
                g = g * (1.0 - tanh_s * tanh_s)
            grad_h[rows] = _mm(g, w_s_c, opts.matmul_dtype)
            grad_w += _mm(g.t(), h_s[rows], opts.matmul_dtype)
        kl_mean = kl_sum * (T * T / n)
        ce_mean = ce_sum / m
        loss = (1.0 - a) * kl_mean + a * ce_mean
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return loss, kl_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if grad_h is None else (grad_h * grad_loss).to(h_dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(w_dtype)
        return gh, gw, None, None, None, None


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    options: KDLossOptions = KDLossOptions(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl, ce)`` over rows of ``[N, H]`` hidden states (see the module docstring);
    ``loss`` carries gradients to ``student_hidden`` and ``student_head``."""
    if student_hidden.shape[0] != teacher_hidden.shape[0] or targets.shape[0] != student_hidden.shape[0]:
        raise ValueError("student rows, teacher rows and targets must agree")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(
            f"student vocabulary {student_head.shape[0]} != teacher vocabulary {teacher_head.shape[0]}"
        )
    return _FusedKD.apply(student_hidden, student_head, teacher_hidden.float(), teacher_head, targets, options)


def reference_kd_loss(student_hidden, student_head, teacher_hidden, teacher_head, targets, options=KDLossOptions()):
    """The same loss written plainly with autograd, float32 (for tests)."""
    z_s = student_hidden @ student_head.t()
    z_t = teacher_hidden @ teacher_head.t()
    if options.student_softcap is not None:
        z_s = options.student_softcap * torch.tanh(z_s / options.student_softcap)
    if options.teacher_softcap is not None:
        z_t = options.teacher_softcap * torch.tanh(z_t / options.teacher_softcap)
    T, a = options.temperature, options.ce_weight
    log_p = torch.log_softmax(z_t / T, -1)
    kl = (log_p.exp() * (log_p - torch.log_softmax(z_s / T, -1))).sum(-1).mean() * T * T
    ce = torch.nn.functional.cross_entropy(z_s, targets, ignore_index=-100)
    return (1 - a) * kl + a * ce, kl.detach(), ce.detach()
