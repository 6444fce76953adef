"""Choosing the next token from the last position's logits: greedy or seeded sampling.

A ``TokenSelector`` maps last-position logits [B, V] to token ids [B]: ``argmax_selector``
(greedy, the default of ``generate``) or ``Sampling(temperature, top_k, top_p, seed).selector(B)``,
seeded per row so that a seed reproduces its tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pangu_light.runtime.errors import RuntimeUserError

__all__ = ["Sampling", "TokenSelector", "argmax_selector"]

# last-position logits [batch, vocab] -> next token ids [batch] (int64)
TokenSelector = Callable[[np.ndarray], np.ndarray]


def argmax_selector(logits: np.ndarray) -> np.ndarray:
    """Greedy choice: the first index of the largest logit in each row."""
    return np.argmax(logits, axis=-1).astype(np.int64)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``selector(batch)`` makes a seeded ``TokenSelector`` from them.

    For each row of last-position logits z (computed in float64):

    1. ``temperature`` T: p = softmax(z / T). T = 0 is greedy (the arg-max).
    2. ``top_k`` k > 0: keep the k largest logits (k = 1 is the arg-max, first index on ties,
       exactly as greedy); 0 keeps all.
    3. ``top_p`` p in (0, 1]: of what is left, keep the smallest set of most likely tokens
       whose probabilities sum to at least p (the nucleus; always at least one token).
    4. Draw one token from the kept probabilities, renormalised.

    Each row has its own random stream, ``SeedSequence(seed).spawn(batch)[row]``, so with a
    seed the same prompts give the same tokens in every call, whatever the other rows do
    (a finished row still draws, and its draw is discarded). ``seed=None`` draws fresh
    entropy.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise RuntimeUserError(f"temperature must be 0 (greedy) or more (got {self.temperature})")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise RuntimeUserError(f"top_k must be a whole number, 0 for no limit (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise RuntimeUserError(f"top_p must be in (0, 1], 1 for no nucleus cut (got {self.top_p})")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or self.seed < 0):
            raise RuntimeUserError(f"seed must be a non-negative whole number (got {self.seed})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def selector(self, batch: int) -> TokenSelector:
        """A fresh selector for ``batch`` rows: the same seed gives the same draws."""
        if self.greedy:
            return argmax_selector
        generators = [np.random.default_rng(child) for child in np.random.SeedSequence(self.seed).spawn(batch)]

        def select(logits: np.ndarray) -> np.ndarray:
            if logits.shape[0] != batch:
                raise RuntimeUserError(
                    f"this sampling selector was made for {batch} rows but got {logits.shape[0]}: "
                    "make one per generation call (Sampling.selector(batch))"
                )
            return np.array(
                [self.sample_row(row, generator) for row, generator in zip(logits, generators)], dtype=np.int64
            )

        return select

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) that one row's draw chooses from: with a top-k or top-p cut,
        most likely first (ties by index); without one, the whole vocabulary in id order."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        vocab = z.shape[-1]
        if self.top_k and self.top_k < vocab:
            ids = np.argpartition(-z, self.top_k - 1)[: self.top_k]
        elif self.top_p < 1:
            ids = np.arange(vocab)
        else:  # no cut at all: no need to sort
            probs = np.exp(z - z.max())
            return np.arange(vocab), probs / probs.sum()
        ids = ids[np.lexsort((ids, -z[ids]))]  # by logit, descending; ties by index
        probs = np.exp(z[ids] - z[ids[0]])
        probs /= probs.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
        return ids, probs

    def sample_row(self, logits: np.ndarray, generator: np.random.Generator) -> int:
        ids, probs = self.candidates(logits)
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, generator.random() * cumulative[-1], side="right"))
        return int(ids[min(index, len(ids) - 1)])
