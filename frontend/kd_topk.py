"""Distillation loss over the teacher's top-k tokens plus one tail bucket (``--kd topk``).

For one position, p = softmax(z_t / T) the teacher's and q = softmax(z_s / T) the student's
distribution over the vocabulary V. The teacher is kept as its k most likely tokens K (their
log-probabilities log p_i and ids) and its remaining mass P = sum_{j not in K} p_j; the student's
remaining mass is Q = sum_{j not in K} q_j. The loss is the KL between the two distributions over
the k + 1 buckets (K, then "the rest")::

    KL_k = sum_{i in K} p_i (log p_i - log q_i) + P (log P - log Q)        (0 log 0 = 0)
    L    = (1 - a) T^2 mean_n KL_k + a CE(z_s, y)                          (as in kd_loss)

Gradient (u = z_s / T; d log q_i / d u_j = [i = j] - q_j, d log Q / d u_j = [j not in K] q_j / Q - q_j)::

    dKL_k / du_j = q_j - t_j,     t_j = p_j (j in K),   t_j = P q_j / Q (j not in K)

so t is the teacher's top-k with its tail spread like the student's tail, and the chunked
kernel of ``kd_loss`` (student head fused, closed-form gradient) runs unchanged with t in place of
p. With k = V, P = Q = 0 and KL_k, t are the full-vocabulary KL and p exactly.

Error bound. With p~, q~ the teacher's and student's distributions restricted to the tail and
renormalised (p~_j = p_j / P, q~_j = q_j / Q), the chain rule of KL (grouping is a coarse-graining)
gives exactly::

    KL(p || q) = KL_k + P KL(p~ || q~)

and for d_j = (z_t,j - z_s,j) / T, log(p~_j / q~_j) = d_j - log sum_l q~_l e^{d_l} <= max d - min d
over the tail, so KL(p~ || q~) <= range_{j not in K} d_j, and::

    0 <= KL(p || q) - KL_k <= P (max_{j not in K} (z_t,j - z_s,j) - min_{j not in K} (z_t,j - z_s,j)) / T

per position: the loss is under-estimated by at most the teacher's tail mass times the spread of
the logit difference on the tail (times T^2 in L). top-k KD trains the head of the distribution
exactly and only the total of the tail.
"""

from __future__ import annotations

import dataclasses

import torch

from pangu_light.frontend.kd_loss import KDLossOptions, _FusedKD

__all__ = ["TopKTeacher", "fused_topk_kd_loss", "reference_topk_kd_loss", "teacher_topk", "topk_error_bound"]


@dataclasses.dataclass
class TopKTeacher:
    """Per position: the teacher's top-k log-probabilities at T [N, k] (descending), their token
    ids [N, k] and the remaining probability mass P [N]."""

    log_p: torch.Tensor
    index: torch.Tensor
    tail: torch.Tensor

    def kl_and_target(self, rows: slice, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the rows of KL_k, the target t) for the student's log-probabilities at T."""
        log_p, index, tail = self.log_p[rows].float(), self.index[rows].long(), self.tail[rows].float()
        p = log_p.exp()
        log_tail_q = torch.logsumexp(log_q.scatter(1, index, float("-inf")), dim=-1)  # log Q, exact on a small Q
        positive = tail > 0
        safe_tail = torch.where(positive, tail, torch.ones_like(tail))
        bucket = torch.where(positive, tail * (safe_tail.log() - log_tail_q), torch.zeros_like(tail))
        kl = ((p * (log_p - log_q.gather(1, index))).sum() + bucket.sum()).double()
        # t_j = exp(log q_j + log P - log Q) on the tail, p_j on the top-k.
        shift = torch.where(positive, safe_tail.log() - log_tail_q, torch.full_like(tail, float("-inf")))
        target = (log_q + shift[:, None]).exp_().scatter_(1, index, p)
        return kl, target


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """The top-k of the teacher's (soft-capped) logits [N, V] at ``temperature``; the tail mass is
    summed from the other tokens' probabilities (not 1 - sum top-k, which loses a small tail)."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    k = min(k, log_p.shape[-1])
    values, index = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(1, index, float("-inf")), dim=-1).exp()
    return TopKTeacher(values, index, tail)


def fused_topk_kd_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher: TopKTeacher,
                       targets: torch.Tensor, options: KDLossOptions | None = None):
    """``(loss, kl, ce)`` with KL_k in place of the full KL (module docstring); ``loss`` carries
    gradients to ``student_hidden`` and ``student_head``. ``options.teacher_softcap`` is unused
    (the cache holds the capped teacher's probabilities)."""
    options = options or KDLossOptions()
    n = student_hidden.shape[0]
    if not (teacher.log_p.shape[0] == teacher.index.shape[0] == teacher.tail.shape[0] == n == targets.shape[0]):
        raise ValueError("student rows, teacher rows and targets must agree")
    if int(teacher.index.max()) >= student_head.shape[0]:
        raise ValueError(f"teacher token ids reach {int(teacher.index.max())}, past the student's vocabulary")
    return _FusedKD.apply(student_hidden, student_head, teacher, targets, options, torch.is_grad_enabled())


def reference_topk_kd_loss(student_hidden, student_head, teacher: TopKTeacher, targets, options=None):
    """The same loss written plainly with autograd, float32 (for tests)."""
    options = options or KDLossOptions()
    z_s = student_hidden @ student_head.t()
    if options.student_softcap is not None:
        z_s = options.student_softcap * torch.tanh(z_s / options.student_softcap)
    T, a = options.temperature, options.ce_weight
    log_q = torch.log_softmax(z_s / T, -1)
    q_k = log_q.gather(1, teacher.index)
    q_tail = 1.0 - q_k.exp().sum(-1)
    p, tail = teacher.log_p.exp(), teacher.tail
    head = (p * (teacher.log_p - q_k)).sum(-1)
    bucket = torch.where(tail > 0, tail * (tail.clamp_min(1e-30).log() - q_tail.clamp_min(1e-30).log()), 0.0)
    kl = (head + bucket).mean() * T * T
    ce = torch.nn.functional.cross_entropy(z_s, targets, ignore_index=-100)
    return (1 - a) * kl + a * ce, kl.detach(), ce.detach()


@torch.no_grad()
def topk_error_bound(student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher: TopKTeacher,
                     temperature: float = 1.0) -> torch.Tensor:
    """Per position, P (max - min over the tail of (z_t - z_s)) / T: the bound on KL - KL_k."""
    d = (teacher_logits - student_logits).float() / temperature
    high = d.scatter(1, teacher.index, float("-inf")).amax(-1)
    low = d.scatter(1, teacher.index, float("inf")).amin(-1)
    spread = torch.where(teacher.tail > 0, high - low, torch.zeros_like(high))
    return teacher.tail * spread

