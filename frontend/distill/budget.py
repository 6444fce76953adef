"""The wall-clock budget of a run (``--time-budget``) and the clock every timing in the loop reads.

Elapsed time t counts from the start of training (after the set-up: loading, re-import, the
teacher cache, also the chunks of it built between steps under a budget, ``paused``),
evaluations and checkpoints included, and carries over a resume. With a budget
B the loop takes step s + 1 only while

    t + d <= B          d = the mean wall time of the training steps taken so far

so it stops at most one step before B (and past B only when a step runs slower than the mean),
and it always takes at least one step, so a budget shorter than one step still writes a valid
distilled model (one step trained) rather than an error or an untouched copy of the input.

Under ``torchrun`` only rank 0 reads its clock; t is broadcast to every rank each step, so all
ranks stop after the same step and see the same learning rate (the schedule may depend on t,
``lr_factor``'s ``progress``), which DDP and FSDP need to keep the replicas equal.

``clock`` is a module attribute so that tests can replace it (a fake clock, not real sleeping).
Each ``tick`` also reads the process clocks of ``usage`` (wall seconds since the process started,
CPU seconds summed over the ranks), which the loop stamps on every metrics entry.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import torch

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.distill.distributed import Dist
from pangu_light.frontend.distill.usage import cpu_seconds, wall_seconds

__all__ = ["Budget", "clock", "parse_duration"]

clock = time.perf_counter

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``1.5h`` (a bare number is seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", text)
    if not match:
        raise PanguLightError(f"--time-budget {text!r}: write a duration such as 90s, 30m or 1.5h")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise PanguLightError(f"--time-budget {text!r} must be longer than zero")
    return seconds


class Budget:
    """Elapsed training time, the same on every rank, and whether to take another step."""

    def __init__(self, dist: Dist, seconds: float | None, *, already: float = 0.0, already_cpu: float = 0.0,
                 already_wall: float = 0.0):
        self.dist = dist
        self.seconds = seconds
        self.already = already  # training seconds of the run before a resume
        self.already_cpu, self.already_wall = already_cpu, already_wall  # process clocks before a resume
        self.started = clock()
        self.elapsed = already
        self.cpu_s = self.wall_s = 0.0  # the process clocks at the last tick (CPU: all ranks)
        self.step_seconds = 0.0  # training steps of this process only (not before a resume)
        self.steps = 0

    def tick(self) -> float:
        """Elapsed seconds now, read on rank 0 and shared with every rank (a collective: every rank
        calls it); with it the CPU seconds of all ranks, summed."""
        elapsed = self.already + clock() - self.started if self.dist.main else 0.0
        value = torch.tensor([elapsed, cpu_seconds()], dtype=torch.float64)
        if self.dist.world > 1:  # rank 0's clock (the others add 0) and every rank's CPU seconds
            device = self.dist.device if self.dist.device.type == "cuda" else torch.device("cpu")
            value = value.to(device)
            torch.distributed.all_reduce(value)
        value = value.cpu()
        self.elapsed = float(value[0])
        self.cpu_s = self.already_cpu + float(value[1])
        self.wall_s = self.already_wall + wall_seconds()
        return self.elapsed

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not counted (a teacher-cache chunk built between steps is set-up)."""
        start = clock()
        try:
            yield
        finally:
            self.started += clock() - start

    def step_done(self, before: float) -> float:
        """After a training step that began at elapsed ``before`` (a ``tick``): tick again and count
        the step's duration from the two broadcast readings, so every rank counts the same."""
        after = self.tick()
        self.step_seconds += after - before
        self.steps += 1
        return after

    def progress(self) -> float | None:
        """Fraction of the budget spent (None without one)."""
        return None if self.seconds is None else min(self.elapsed / self.seconds, 1.0)

    def exhausted(self) -> bool:
        """After ``tick``: whether the next step would end past the budget (never before one step)."""
        if self.seconds is None or self.steps == 0:
            return False
        return self.elapsed + self.step_seconds / self.steps > self.seconds
