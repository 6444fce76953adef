"""What a run has cost so far, for curves read in CPU-minutes on a loaded machine, and where its
set-up time goes.

Every ``metrics.jsonl`` entry carries, beside ``elapsed_s`` (training seconds on the budget's
clock) and ``tokens``, two process clocks read when the entry was made:

    wall_s   wall seconds since the process started (``process_start``): set-up included
    cpu_s    CPU seconds of the run: ``time.process_time`` (every thread of the process) plus
             finished child processes; under ``torchrun`` the sum over the ranks

On a machine shared with other work, wall time stretches with the load while CPU seconds do not
(much): a curve against ``cpu_s`` compares runs made under different loads. Both are real
clocks, never the budget's ``clock`` (which tests replace).

``Stages`` times named parts of a set-up (re-import, teacher load, teacher cache, ...), wall and
CPU seconds each, for ``summary.json``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator

__all__ = ["Stages", "cpu_seconds", "process_start", "stamp", "wall_seconds"]


def process_start() -> float:
    """The process's start as a ``time.time`` reading (its creation time from /proc when readable,
    else the import of this module)."""
    return _START


def _read_start() -> float:
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # psutil missing or refused: from this module's import instead
        return time.time()


_START = _read_start()


def wall_seconds() -> float:
    """Wall seconds since the process started."""
    return max(time.time() - _START, 0.0)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, all its threads, and its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def stamp(entry: dict, *, cpu: float | None = None, wall: float | None = None) -> dict:
    """``entry`` with ``wall_s`` and ``cpu_s`` (read now unless given, e.g. summed over ranks)."""
    entry["wall_s"] = round(wall_seconds() if wall is None else wall, 3)
    entry["cpu_s"] = round(cpu_seconds() if cpu is None else cpu, 3)
    return entry


class Stages:
    """Wall and CPU seconds of named stages: ``with stages("teacher cache"): ...``; a name timed
    twice adds up. ``seconds`` maps each name to its wall seconds, ``cpu`` to its CPU seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - wall, 3)
            self.cpu[name] = round(self.cpu.get(name, 0.0) + cpu_seconds() - cpu, 3)

    def to_json(self) -> dict[str, dict[str, float]]:
        return {name: {"wall_s": self.seconds[name], "cpu_s": self.cpu[name]} for name in self.seconds}

    def merge(self, other: Stages, prefix: str = "") -> None:
        for name in other.seconds:
            self.seconds[prefix + name] = self.seconds.get(prefix + name, 0.0) + other.seconds[name]
            self.cpu[prefix + name] = self.cpu.get(prefix + name, 0.0) + other.cpu[name]
