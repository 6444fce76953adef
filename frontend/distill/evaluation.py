"""Held-out evaluation over one or several text sources, each reported apart.

The evaluation windows of a run are the windows of its sources one after another
(``eval_sources``: (name, count) in order, e.g. LAMBADA's then Wikipedia's evaluation split).
They are cut into micro-batches that never straddle two sources, and for every source s

    KL_s  = sum over its windows' positions of KL(teacher || student) / its positions
    NLL_s = sum over its predicted tokens of -log q(next token) / its predicted tokens
    ppl_s = exp(NLL_s)

An entry holds ``eval_kl``, ``eval_nll`` and ``eval_perplexity`` over all windows (one source:
that source's) and, with several sources, ``eval_kl_<name>`` and ``eval_perplexity_<name>``
for each, so one run gives a curve per source on the same windows as every other run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from pangu_light.frontend.distill.objective import next_token_targets

__all__ = ["EvalTotals", "eval_chunks", "evaluate"]


def eval_chunks(windows: np.ndarray, size: int, sources: Sequence[tuple[str, int]] | None = None
                ) -> list[tuple[str, torch.Tensor]]:
    """(source name, ids [<= size, L]) micro-batches of ``windows``, none across two sources."""
    sources = list(sources) if sources else [("", len(windows))]
    if sum(count for _, count in sources) != len(windows):
        raise ValueError(f"eval sources {sources} do not add up to the {len(windows)} evaluation windows")
    chunks, start = [], 0
    for name, count in sources:
        for first in range(start, start + count, size):
            rows = windows[first:min(first + size, start + count)]
            chunks.append((name, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))))
        start += count
    return chunks


class EvalTotals:
    """Sums of KL (per position) and NLL (per predicted token) per source; ``metrics`` at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}  # name -> [kl sum, positions, nll sum, targets]

    def add(self, name: str, kl: float, positions: int, nll: float, targets: int) -> None:
        """Add a micro-batch whose mean KL over ``positions`` is ``kl`` and mean NLL over ``targets`` is ``nll``."""
        total = self.sums.setdefault(name, [0.0, 0, 0.0, 0])
        total[0] += kl * positions
        total[1] += positions
        total[2] += nll * targets
        total[3] += targets

    def metrics(self) -> dict[str, float]:
        kl, positions, nll, targets = (sum(t[i] for t in self.sums.values()) for i in range(4))
        out = {"eval_kl": kl / positions, "eval_nll": nll / targets, "eval_perplexity": math.exp(nll / targets)}
        if len(self.sums) > 1:
            for name, (kl_s, positions_s, nll_s, targets_s) in self.sums.items():
                out[f"eval_kl_{name}"] = kl_s / positions_s
                out[f"eval_perplexity_{name}"] = math.exp(nll_s / targets_s)
        return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
             teacher_head: torch.Tensor, options, device: torch.device) -> dict[str, float]:
    """``EvalTotals.metrics`` of ``model`` (a ``DistillObjective``, possibly wrapped) over (source,
    ids, teacher hidden states) batches, ``options`` at T = 1 without CE; leaves it training."""
    model.eval()
    totals = EvalTotals()
    for name, ids, teacher_h in batches:
        targets = next_token_targets(ids)
        _, kl, ce = model(ids.to(device), teacher_h.to(device), teacher_head, targets.to(device), options)
        totals.add(name, float(kl), ids.numel(), float(ce), int((targets >= 0).sum()))
    model.train()
    return totals.metrics()
