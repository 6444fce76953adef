"""Perplexity of a graph on held-out token sequences, under ONNX Runtime.

    NLL = - 1/T * sum_{b, t >= 1} log softmax(logits[b, t - 1])[ids[b, t]],   perplexity = exp(NLL)

over T = N * (L - 1) predicted tokens of N sequences of L tokens (no padding: the sequences
are fixed-length windows from ``calib.corpora``). The log-softmax runs in float64 on the
logits ORT returns, one batch at a time, so memory stays at one batch of logits.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from pangu_light.core.errors import PanguLightError

__all__ = ["Perplexity", "perplexity"]


@dataclasses.dataclass
class Perplexity:
    perplexity: float
    nll: float
    tokens: int

    def to_json(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def perplexity(
    graph_path: str | os.PathLike,
    sequences: np.ndarray,
    *,
    batch_size: int = 4,
    provider: str = "cpu",
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    from pangu_light.runtime.session import create_session

    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise PanguLightError("perplexity needs sequences of at least 2 tokens, shaped [N, L]")
    if batch_size < 1:
        raise PanguLightError(f"batch size must be at least 1 (got {batch_size})")
    session = create_session(graph_path, provider=provider, threads=threads).session
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start : start + batch_size].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for spec in past_inputs:  # a decode graph evaluates with an empty past
            feeds[spec.name] = np.zeros((len(ids), spec.shape[1], 0, spec.shape[3]), np.float32)
        (logits,) = session.run(["logits"], feeds)
        logits = logits[:, :-1].astype(np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
        target = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        total += float((log_norm - target).sum())
        count += target.size
        if on_batch is not None:
            on_batch(int(ids.size))
    nll = total / count
    return Perplexity(perplexity=float(np.exp(nll)), nll=nll, tokens=count)
