"""A per-layer cost model of a shape's run time, fitted to measured speedups.

The time of a shape relative to the unpruned model, 1 / speedup, is modelled as a non-negative
mix of its parts, each as a fraction of the unpruned model's:

    t = c_const                              (the generation loop, sampling, session overhead)
      + c_layer * layers / L                 (per-layer constant: norms, RoPE, launches)
      + c_attn  * sum_l hidden (2 q_l + 2 kv_l) d / base     (q, k, v, o projections)
      + c_ffn   * sum_l 3 hidden ffn_l / base                (gate, up, down)
      + c_head  * hidden / hidden_0                          (lm_head and embedding)
      + c_cache * sum_l kv_l d / base                        (KV cache read by attention)

with q_l, kv_l the query and KV heads of kept layer l and d the head dimension. The fit is
non-negative least squares (every subset of the parts, the best fit whose coefficients are all
>= 0), with the unpruned shape as a point (t = 1). ``leave_one_out`` reports the error of the
predicted speedup on each measured shape with that shape held out.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["FEATURES", "CostModel", "features", "leave_one_out"]

FEATURES = ("const", "layers", "attention", "ffn", "lm_head", "kv_cache")


def features(shape: dict[str, Any], base: dict[str, Any], head_dim: int = 1) -> np.ndarray:
    """The parts above for ``shape`` (from ``candidates.shape_of_plan``) as fractions of ``base``'s."""

    def parts(s: dict[str, Any]) -> np.ndarray:
        h, layers = s["hidden"], s["layers"]
        attention = sum(h * (2 * k * g + 2 * k) * head_dim for k, g, _ in layers)
        ffn = sum(3 * h * f for _, _, f in layers)
        cache = sum(k * head_dim for k, _, _ in layers)
        return np.array([1.0, len(layers), attention, ffn, h, cache], dtype=np.float64)

    b = parts(base)
    return parts(shape) / np.where(b > 0, b, 1.0)


class CostModel:
    def __init__(self, coefficients: np.ndarray):
        self.coefficients = coefficients

    @classmethod
    def fit(cls, rows: Sequence[np.ndarray], times: Sequence[float]) -> CostModel:
        x, y = np.asarray(rows, dtype=np.float64), np.asarray(times, dtype=np.float64)
        best, best_error = np.zeros(x.shape[1]), np.inf
        columns = range(x.shape[1])
        for size in range(1, min(len(y), x.shape[1]) + 1):
            for subset in itertools.combinations(columns, size):
                solution, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
                if np.any(solution < 0):
                    continue
                error = float(np.sum((x[:, subset] @ solution - y) ** 2))
                if error < best_error - 1e-15:
                    best_error = error
                    best = np.zeros(x.shape[1])
                    best[list(subset)] = solution
        return cls(best)

    def time(self, row: np.ndarray) -> float:
        return float(row @ self.coefficients)

    def speedup(self, row: np.ndarray) -> float:
        t = self.time(row)
        return 1.0 / t if t > 0 else float("inf")

    def to_json(self) -> dict[str, float]:
        return {name: round(float(c), 6) for name, c in zip(FEATURES, self.coefficients)}


def leave_one_out(rows: Sequence[np.ndarray], speedups: Sequence[float], base_row: np.ndarray) -> list[float]:
    """Relative error (predicted / measured - 1) of each measured speedup, predicted by a model
    fitted to the others (and the unpruned point)."""
    errors = []
    for held in range(len(rows)):
        keep = [i for i in range(len(rows)) if i != held]
        model = CostModel.fit([base_row] + [rows[i] for i in keep], [1.0] + [1.0 / speedups[i] for i in keep])
        errors.append(model.speedup(rows[held]) / speedups[held] - 1.0)
    return errors
