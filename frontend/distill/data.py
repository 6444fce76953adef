"""The training data of a run: which windows each step takes, and the teacher's final hidden
states for those windows (from the on-disk cache, or computed online).

Order: the training windows are shuffled by ``seed`` once per epoch (epoch e uses
``default_rng([seed, e]).permutation``), and step s takes positions [s G, (s + 1) G) of that
endless order (G, the global batch); micro-batch k of a step goes to rank k mod world. The order
is a function of the step alone, so a resumed run takes the same windows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from pangu_light.frontend.distill.config import DistillConfig
from pangu_light.frontend.distill.distributed import Dist
from pangu_light.frontend.distill.evaluation import eval_chunks
from pangu_light.frontend.distill.usage import Stages
from pangu_light.frontend.kd_topk import TopKTeacher, teacher_topk
from pangu_light.frontend.teacher_cache import TeacherCache, TopKCache, teacher_hidden

__all__ = ["TrainingData", "schedule_windows"]


def schedule_windows(num_windows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Window indices at positions [start, start + count) of the endless seeded order."""
    out = np.empty(count, dtype=np.int64)
    position = start
    filled = 0
    while filled < count:
        epoch, offset = divmod(position, num_windows)
        order = np.random.default_rng([seed, epoch]).permutation(num_windows)
        take = min(count - filled, num_windows - offset)
        out[filled:filled + take] = order[offset:offset + take]
        filled += take
        position += take
    return out


CHUNK_STEPS = 8  # under a time budget the teacher cache grows by the windows of this many steps


@dataclasses.dataclass
class TrainingData:
    """The windows of a run with the teacher's states for them; ``batch`` and ``eval_batches``
    hand out token ids [B, L] with the teacher's final hidden states [B, L, H] (float32, CPU), or
    for training under ``kd = "topk"`` its top-k (``TopKTeacher``, [B, L, k]); evaluation always
    gets the hidden states, so held-out KL is the full-vocabulary KL whatever the training loss.

    The cache is a list of chunks, each an ordinary cache of a set of windows. Without a time
    budget it is one chunk of every window the run will use, built in the set-up. Under a time
    budget, whose steps are only a cap (by default one pass over all the training windows, far
    more than a short budget reaches), chunk c holds the windows first used by steps
    [c S, (c + 1) S) (S = ``CHUNK_STEPS``) and is built just before its first step needs it
    (``ensure``; the budget's clock paused, as it is for the set-up), so a run builds at most
    one chunk more than it uses. Chunks are named by their windows like any cache: a later run
    on the same data and seed finds them."""

    config: DistillConfig
    dist: Dist
    teacher: torch.nn.Module
    teacher_id: str
    global_batch: int
    cache: list[TeacherCache | TopKCache | None] | None  # per chunk (None: not built yet); None: online
    cache_chunk: np.ndarray  # training window -> its chunk (-1: never used)
    cache_rows: np.ndarray  # training window -> row within its chunk (-1: never used)
    chunks: list[np.ndarray]  # the training windows of each chunk, in cache order
    eval_teacher: list[torch.Tensor]  # one per evaluation micro-batch, kept in memory

    @classmethod
    def prepare(cls, config: DistillConfig, dist: Dist, *, teacher: torch.nn.Module, teacher_id: str,
                global_batch: int, say: Callable[[str], None], stages: Stages | None = None,
                eval_teacher: list[torch.Tensor] | None = None) -> TrainingData:
        """Build (rank 0) or open (the other ranks, after it) the teacher cache of the windows the
        run will use (under a time budget: none yet, see ``ensure``), and compute the teacher's
        states on the evaluation windows (timed in ``stages`` as teacher_cache and eval_teacher)
        unless given (``eval_teacher``, one per ``eval_chunks``)."""
        stages = Stages() if stages is None else stages
        # Past one epoch every window is used (and the step count may be a large cap under a budget).
        total_positions = min(config.steps * global_batch, len(config.train_windows))
        order = schedule_windows(len(config.train_windows), config.seed, 0, total_positions)
        if config.time_budget is None:
            chunks = [np.unique(order)]
        else:  # the windows in order of first use, CHUNK_STEPS steps' worth a chunk
            first_use = order[np.sort(np.unique(order, return_index=True)[1])]
            size = CHUNK_STEPS * global_batch
            chunks = [np.sort(first_use[i:i + size]) for i in range(0, len(first_use), size)]
        cache_chunk = np.full(len(config.train_windows), -1, dtype=np.int64)
        cache_rows = np.full(len(config.train_windows), -1, dtype=np.int64)
        for index, chunk in enumerate(chunks):
            cache_chunk[chunk], cache_rows[chunk] = index, np.arange(len(chunk))
        cache = None if config.online_teacher else [None] * len(chunks)
        if eval_teacher is None:
            with stages("eval_teacher"):
                eval_teacher = [teacher_hidden(teacher, ids) for _, ids in
                                eval_chunks(config.eval_windows, config.micro_batch, config.eval_sources)]
        data = cls(config, dist, teacher, teacher_id, global_batch, cache, cache_chunk, cache_rows, chunks,
                   eval_teacher)
        if cache is not None and config.time_budget is None:
            with stages("teacher_cache"):
                data._build(range(len(chunks)), say)
        return data

    def missing(self, step: int) -> list[int]:
        """The chunks step ``step`` (every micro-batch, every rank) reads that are not built yet."""
        if self.cache is None:
            return []
        windows = schedule_windows(len(self.config.train_windows), self.config.seed, step * self.global_batch,
                                   self.global_batch)
        return [int(c) for c in np.unique(self.cache_chunk[windows]) if self.cache[c] is None]

    def ensure(self, step: int, say: Callable[[str], None]) -> None:
        """Build the chunks step ``step`` needs (a collective when any is missing: every rank calls it)."""
        self._build(self.missing(step), say)

    def _build(self, indices, say: Callable[[str], None]) -> None:
        c = self.config
        indices = list(indices)
        if not indices:
            return
        cache_dir = Path(c.teacher_cache_dir or Path(c.output) / "teacher_cache")
        if c.kd == "topk":
            kind, extra = TopKCache, {"k": c.top_k, "temperature": c.temperature}
        else:
            kind, extra = TeacherCache, {}
        count = sum(len(self.chunks[i]) for i in indices)
        if self.dist.main:
            say(f"... teacher cache: {count} windows x {c.train_windows.shape[1]} tokens in {cache_dir}")
        for build in (True, False):  # rank 0 builds; then, after it, the others open
            if self.dist.main == build:
                for i in indices:
                    self.cache[i] = kind.open_or_build(
                        cache_dir, teacher=self.teacher if build else None, identity=self.teacher_id,
                        windows=c.train_windows[self.chunks[i]], dtype=c.teacher_cache_dtype,
                        batch_size=c.micro_batch, build=build, quiet=c.quiet, **extra,
                    )
            if build:
                self.dist.barrier()

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor | TopKTeacher]:
        """This rank's ``micro``-th micro-batch of ``step``: ids and the teacher's hidden states (or top-k)."""
        c = self.config
        k = micro * self.dist.world + self.dist.rank
        start = step * self.global_batch + k * c.micro_batch
        windows = schedule_windows(len(c.train_windows), c.seed, start, c.micro_batch)
        ids = torch.from_numpy(np.ascontiguousarray(c.train_windows[windows], dtype=np.int64))
        if self.cache is not None:
            return ids, self._cached(windows)
        if c.kd == "topk":
            with torch.no_grad():
                logits = self.teacher(input_ids=ids.to(self.dist.device), use_cache=False).logits
            top = teacher_topk(logits.reshape(-1, logits.shape[-1]), c.top_k, c.temperature)
            return ids, TopKTeacher(top.log_p.cpu(), top.index.cpu(), top.tail.cpu())
        return ids, teacher_hidden(self.teacher, ids)

    def _cached(self, windows: np.ndarray):
        """The teacher's cached states (or top-k) for ``windows``, from the chunks that hold them."""
        chunk, rows = self.cache_chunk[windows], self.cache_rows[windows]
        if (chunk == chunk[0]).all():
            return self.cache[chunk[0]][rows]
        parts = [self.cache[k][rows[i:i + 1]] for i, k in enumerate(chunk)]
        if isinstance(parts[0], TopKTeacher):
            return TopKTeacher(*(torch.cat([getattr(p, f) for p in parts]) for f in ("log_p", "index", "tail")))
        return torch.cat(parts)

    def eval_batches(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """The evaluation windows in micro-batches (``eval_chunks``: source name, ids), with the
        teacher's states for each."""
        chunks = eval_chunks(self.config.eval_windows, self.config.micro_batch, self.config.eval_sources)
        return ((name, ids, teacher) for (name, ids), teacher in zip(chunks, self.eval_teacher))
