"""The optimizer of a distillation run and its learning-rate schedule: AdamW (weight decay on
matrices only) and a linear warm-up, then a cosine decay.

With W warm-up steps (at least), a warm-up fraction F of the run, S steps (the cap under a time
budget), r = min_lr_ratio and, under a time budget B, the fraction of it spent t = elapsed / B
when step s (0-based) starts, lr(s) = lr x warm(s) x cos(s):

    without a budget:  W' = min(S, max(W, ceil(F S)))          the warm-up's steps
                       warm(s) = min(1, (s + 1) / W')
                       p = (s - W')+ / (S - W')
    under a budget:    warm(s) = min(1, (s + 1) / W, max(1 / W, t / F))     (t / F = 1 when F = 0)
                       p = max((s - W)+ / (S - W), (t - F)+ / (1 - F))
    cos(s) = r + (1 - r) (1 + cos(pi p)) / 2

So a budgeted warm-up ends at the later of W steps and F of the budget, rising with both; it
starts at lr / W and never falls (the time ramp is floored at the first step's factor), and the
cosine then follows the clock from F of the budget to its end, so a run that stops on its budget
has decayed to r just as one that runs all its steps. W = F = 0 is no warm-up; F > 0 needs
W >= 1 (``check_config``).

Why a warm-up: AdamW's first steps move every weight by about lr in the direction of its
gradient's sign (the second moment has seen one gradient), a coherent change across a whole
matrix; on a pruned SmolLM2 the first step at lr 1e-4 without warm-up raised the held-out
perplexity 10-20x, more than a 10-minute CPU budget could undo.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pangu_light.core.errors import PanguLightError

__all__ = [
    "MIN_WARMUP_STEPS", "lr_factor", "make_optimizer", "make_scheduler", "parse_warmup", "warmup_factor",
    "warmup_record", "warmup_steps",
]

MIN_WARMUP_STEPS = 4  # a warm-up given as a fraction of the run lasts at least this many steps


def parse_warmup(text: str) -> tuple[int, float]:
    """(W steps at least, F fraction of the run) from ``--warmup``: an integer is W steps (F = 0), a
    number in (0, 1) is F with W = MIN_WARMUP_STEPS; 0 is no warm-up."""
    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if value.isdigit():
        return int(value), 0.0
    if 0.0 < number < 1.0:
        return MIN_WARMUP_STEPS, number
    raise PanguLightError(
        f"--warmup {text!r}: give whole steps (20; 0 for none) or a fraction of the run between 0 and 1 (0.1)"
    )


def warmup_steps(total: int, warmup: int, fraction: float) -> int:
    """W', the warm-up's steps in a run of ``total`` steps without a time budget."""
    return min(total, max(warmup, math.ceil(fraction * total)))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, spent: float | None = None,
              fraction: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of at most ``total``;
    ``spent``: the fraction of the time budget used when the step starts (None without a budget)."""
    warm, progress = _warmup_and_progress(step, total, warmup, spent, fraction)
    return warm * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_factor(step: int, total: int, warmup: int, spent: float | None = None, fraction: float = 0.0) -> float:
    """warm(s) alone: 1 once the warm-up is over (what a run records per step)."""
    return _warmup_and_progress(step, total, warmup, spent, fraction)[0]


def _warmup_and_progress(step: int, total: int, warmup: int, spent: float | None,
                         fraction: float) -> tuple[float, float]:
    if spent is None:
        steps = warmup_steps(total, warmup, fraction)
        warm = min(1.0, (step + 1) / steps) if steps else 1.0
        return warm, min(max(step - steps, 0) / max(total - steps, 1), 1.0)
    spent = min(max(spent, 0.0), 1.0)
    warm = 1.0
    if warmup:
        time_ramp = max(1.0 / warmup, spent / fraction) if fraction else 1.0
        warm = min(1.0, (step + 1) / warmup, time_ramp)
    progress = max(min(max(step - warmup, 0) / max(total - warmup, 1), 1.0),
                   max(spent - fraction, 0.0) / (1.0 - fraction))
    return warm, progress


def warmup_record(config, history: list[dict]) -> dict:
    """The warm-up asked for, and the step (1-based) whose learning rate first had the full value
    of the schedule (None: the run ended inside its warm-up), from the steps' ``warmup`` entries."""
    ended = next((h["step"] for h in history if h.get("warmup", 0.0) >= 1.0), None)
    return {"steps": config.warmup_steps, "fraction": config.warmup_fraction, "ended_at_step": ended}


def make_optimizer(model: torch.nn.Module, config, *, sharded: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``, weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # The fused AdamW kernel is ~4x faster than the foreach one on CPU; FSDP's DTensors take the default.
    fused = {} if sharded else {"fused": True}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=tuple(config.betas), eps=1e-8, **fused,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config,
                   spent: Callable[[], float | None]) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(s) = config.lr x ``lr_factor``; ``spent()``: the fraction of the time budget used so far."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.steps, config.warmup_steps, config.min_lr_ratio, spent(),
                                          config.warmup_fraction)
    )
