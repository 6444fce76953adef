"""The module a training step runs: the student's forward and the fused distillation loss in one,
so that DDP and FSDP see a single forward that uses every parameter; with which attention the
student runs (``attention_for``), which of its parts stay fixed (``freeze_embeddings``), and the
loss's options for training and for held-out evaluation (``loss_options``)."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.kd_loss import KDLossOptions, fused_kd_loss
from pangu_light.frontend.kd_topk import TopKTeacher, fused_topk_kd_loss

__all__ = [
    "DistillObjective", "attention_for", "bf16_speedup", "check_vocabulary", "freeze_embeddings", "loss_options",
    "next_token_targets",
]


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


def freeze_embeddings(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Exclude the embedding and the lm_head (one tensor when tied) from training; refused when the
    hidden size was pruned, since the sliced embedding then has to adapt to the new residual stream."""
    h_s, h_t = student.get_input_embeddings().weight.shape[1], teacher.get_input_embeddings().weight.shape[1]
    if h_s != h_t:
        raise PanguLightError(
            f"--freeze-embeddings: the student's hidden size {h_s} is not the teacher's {h_t}; freeze the "
            "embeddings only when the hidden size was kept"
        )
    student.get_input_embeddings().weight.requires_grad_(False)
    student.get_output_embeddings().weight.requires_grad_(False)


def attention_for(graph, requested: str | None) -> str:
    """The student's attention: ``requested``, else sdpa (eager for Gemma2's soft-capping)."""
    if requested:
        return requested
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    return "eager" if meta.get(contract.FAMILY) == "gemma2" else "sdpa"


def check_vocabulary(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Refuse a teacher whose vocabulary is not the student's (the wrong teacher for the graph)."""
    s_vocab, t_vocab = student.lm_head.weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise PanguLightError(
            f"the student's vocabulary ({s_vocab}) is not the teacher's ({t_vocab}): pass the teacher the "
            "pruned graph was exported from"
        )


def loss_options(config, student: torch.nn.Module, teacher: torch.nn.Module) -> tuple[KDLossOptions, KDLossOptions]:
    """The training loss's options (``config``'s temperature, CE weight, chunk and matmul dtype, each
    model's logit soft-cap) and held-out evaluation's (the same at T = 1 without CE)."""
    train = KDLossOptions(
        temperature=config.temperature, ce_weight=config.ce_weight,
        student_softcap=getattr(student.config, "final_logit_softcapping", None),
        teacher_softcap=getattr(teacher.config, "final_logit_softcapping", None),
        chunk=config.chunk, matmul_dtype=torch.bfloat16 if config.bf16 else torch.float32,
    )
    return train, dataclasses.replace(train, temperature=1.0, ce_weight=0.0)


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.mm(a, b)
    return time.perf_counter() - start


def bf16_speedup(rows: int = 256, inner: int = 576, cols: int = 8192, pairs: int = 5) -> float:
    """How many times faster a bfloat16-autocast matmul is than a float32 one on this machine's CPU:
    the median over ``pairs`` of t_float32 / t_bfloat16, each pair timed back to back (after one
    warm-up pair), on a ``[rows, inner] @ [inner, cols]`` product shaped like a slice of the
    lm_head matmul that dominates a small student's step. A CPU without native bfloat16
    instructions emulates them (measured 62x SLOWER, a ratio of 0.016, on an AVX2 EPYC, which made
    every distillation step there 7-20x slower). Pairs and the median, not the best of each
    precision timed apart on a 384 x 384 square: on a loaded 2-core machine that older measurement
    gave 0.05 to 79 in fresh processes on one CPU, so the default precision was a coin toss; a
    square that small also does not rank the precisions as the lm_head's shape does. About 1 s."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    ratios = []
    for pair in range(pairs + 1):
        float32 = _matmul_seconds(a, b, False)
        bfloat16 = _matmul_seconds(a, b, True)
        if pair:
            ratios.append(float32 / bfloat16)
    return statistics.median(ratios)
