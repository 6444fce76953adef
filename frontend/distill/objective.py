"""The module a training step runs: the student's forward and the fused distillation loss in one,
so that DDP and FSDP see a single forward that uses every parameter."""

from __future__ import annotations

import torch

from pangu_light.frontend.kd_loss import KDLossOptions, fused_kd_loss
from pangu_light.frontend.kd_topk import TopKTeacher, fused_topk_kd_loss

__all__ = ["DistillObjective", "next_token_targets"]


class DistillObjective(torch.nn.Module):
    """The student plus the loss: returns (loss, KL, CE) as ``fused_kd_loss`` does; with the
    teacher's top-k ([B, L, k] tensors) in place of its hidden states, ``fused_topk_kd_loss``.
    The top-k comes as three tensors (log p, ids, tail) so that DDP and FSDP move them."""

    def __init__(self, student: torch.nn.Module, autocast: bool, device_type: str):
        super().__init__()
        self.student = student
        self.autocast = autocast
        self.device_type = device_type

    def forward(self, ids, teacher_h, teacher_head, targets, options: KDLossOptions, topk=None):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.student.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if topk is not None:
            log_p, index, tail = topk
            k = log_p.shape[-1]
            teacher = TopKTeacher(log_p.reshape(-1, k), index.reshape(-1, k), tail.reshape(-1))
            return fused_topk_kd_loss(hidden, self.student.lm_head.weight, teacher, targets.reshape(-1), options)
        return fused_kd_loss(
            hidden, self.student.lm_head.weight, teacher_h.reshape(-1, teacher_h.shape[-1]),
            teacher_head, targets.reshape(-1), options,
        )


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """ids shifted left by one; the last position has no target (-100)."""
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return targets
