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

__all__ = ["FullTeacher", "KDLossOptions", "fused_kd_loss", "reference_kd_loss"]

GRAD_BLOCK_ROWS = 1024  # rows of dL/dz kept for one dL/dW_s matmul (1024 x 49152 bf16: 100 MB)


@dataclasses.dataclass(frozen=True)
class KDLossOptions:
    temperature: float = 1.0
    ce_weight: float = 0.0  # a: 0 is pure KL
    student_softcap: float | None = None  # Gemma2's final_logit_softcapping
    teacher_softcap: float | None = None
    chunk: int = 256  # rows per chunk
    matmul_dtype: torch.dtype = torch.float32


def _cap(x: torch.Tensor, c: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``c tanh(x / c)`` and the tanh (for the derivative), or ``x`` unchanged; in place."""
    if c is None:
        return x, None
    t = x.div_(c).tanh_()
    return t * c, t


class FullTeacher:
    """The teacher's distribution over the whole vocabulary, row chunks of ``cap(h_t W_t^T) / T``."""

    def __init__(self, h_t: torch.Tensor, w_t: torch.Tensor, opts: KDLossOptions):
        self.ht, self.wt_t = h_t.to(opts.matmul_dtype), w_t.detach().to(opts.matmul_dtype).t()  # cast once per call
        self.opts = opts

    def kl_and_target(self, rows: slice, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the rows of KL(p || q), p) for the student's log-probabilities ``log_q`` at T."""
        z_t, _ = _cap(torch.mm(self.ht[rows], self.wt_t).float(), self.opts.teacher_softcap)
        if self.opts.temperature != 1.0:
            z_t.mul_(1.0 / self.opts.temperature)
        log_p = torch.log_softmax(z_t, dim=-1)
        del z_t
        p = log_p.exp()
        kl = torch.dot(p.view(-1), log_p.sub_(log_q).view(-1)).double()  # sum p (log p - log q)
        return kl, p


class _FusedKD(torch.autograd.Function):
    """The chunked loss and its closed-form gradient for any teacher that gives, per row chunk, the
    KL sum and the target distribution t with dKL/d(z_s / T) = q - t (``FullTeacher``, and the
    top-k teacher of ``frontend.kd_topk``)."""

    @staticmethod
    def forward(ctx, h_s, w_s, teacher, targets, opts: KDLossOptions, grad_enabled: bool = True):
        n = h_s.shape[0]
        m = max(int((targets >= 0).sum()), 1)
        T, a = opts.temperature, opts.ce_weight
        dtype = opts.matmul_dtype
        # forward always runs with grad off; the caller's mode says whether a backward can follow
        # (under no_grad needs_input_grad is still True: evaluation paid for both gradients)
        want = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        hs, ws = h_s.detach().to(dtype), w_s.detach().to(dtype)  # cast once per call, not per chunk
        ws_t = ws.t()
        device = h_s.device
        grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=device) if want else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=device) if want else None
        kl_sum = torch.zeros((), dtype=torch.float64, device=device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=device)
        # dL/dW_s = G^T h_s is one large matmul per block of rows (G kept in matmul_dtype), not one
        # small one (plus a [V, H] cast and add) per chunk.
        block = opts.chunk * max(1, GRAD_BLOCK_ROWS // opts.chunk)  # whole chunks per block
        g_block = torch.empty((min(block, n), w_s.shape[0]), dtype=dtype, device=device) if want else None
        block_start = 0
        for start in range(0, n, opts.chunk):
            rows = slice(start, min(start + opts.chunk, n))
            y = targets[rows]
            valid = y >= 0
            hit = valid.nonzero().squeeze(1)
            z_s, tanh_s = _cap(torch.mm(hs[rows], ws_t).float(), opts.student_softcap)
            if a or not want:  # CE at T = 1 (log softmax of the raw student logits)
                log_s = torch.log_softmax(z_s, dim=-1)
                ce_sum += -log_s[hit, y[hit]].double().sum()
            if T != 1.0:
                z_s.mul_(1.0 / T)
            log_q = torch.log_softmax(z_s, dim=-1)
            del z_s
            if not a and T == 1.0 and want:  # CE (reported) from the same log-probabilities
                ce_sum += -log_q[hit, y[hit]].double().sum()
            kl, target = teacher.kl_and_target(rows, log_q)
            kl_sum += kl
            if not want:
                continue
            g = log_q.exp_().sub_(target)  # q - t, in place
            del target
            g.mul_((1.0 - a) * T / n)
            if a:
                soft = log_s.exp_()
                soft[hit, y[hit]] -= 1.0
                soft[~valid] = 0.0
                g.add_(soft, alpha=a / m)
            if tanh_s is not None:
                g.mul_(1.0 - tanh_s * tanh_s)
            g_rows = g_block[start - block_start:start - block_start + g.shape[0]]
            g_rows.copy_(g)
            del g
            grad_h[rows] = torch.mm(g_rows, ws).float()
            end = rows.stop
            if end - block_start == g_block.shape[0] or end == n:
                used = g_block[: end - block_start]
                grad_w += torch.mm(used.t(), hs[block_start:end]).float()
                block_start = end
        kl_mean = (kl_sum * (T * T / n)).float()
        ce_mean = (ce_sum / m).float()
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
    teacher = FullTeacher(teacher_hidden.float(), teacher_head, options)
    return _FusedKD.apply(student_hidden, student_head, teacher, targets, options, torch.is_grad_enabled())


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
