"""Output-projection refit after pruning its inputs: ridge least squares, FLAP bias compensation
and FLAP's fluctuation metric, all from the Gram statistics of ``calib.gram`` (numpy, float64).

A projection y = x W (W in x out, the ONNX MatMul layout) loses inputs: only x_K survives. Over
calibration tokens t, with G = sum_t x_t^T x_t, s = sum_t x_t, N tokens, mu = s / N, the refit
reproduces the UNPRUNED output from the pruned input (one-shot targets: every layer's x comes from
the unpruned model)::

    min_{W', b'}  sum_t || x_t,K W' + b' - x_t W ||^2 + lambda ||W'||^2,
    lambda = ridge * mean(diag G_KK)                                  (ridge 1e-5 by default)

    no intercept:   (G_KK + lambda I) W' = G_K: W                                     b' = 0
    intercept:      (C_KK + lambda I) W' = C_K: W,  C = G - N mu^T mu,   b' = mu W - mu_K W'

(b' is not penalised; minimising over it first leaves the centred problem.) Solved by
``numpy.linalg.solve`` in float64 (scipy's cho_solve would need scipy, not a dependency), never
an explicit inverse.

Bias compensation (FLAP, An et al. 2024) keeps W_K and moves the removed inputs' mean output
into a bias: b' = mu_R W_R (R the removed inputs). The fluctuation metric of input j is
var_t(x_j) * ||W_j||^2 (W_j its row: the weights it writes through); a head sums its d inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pangu_light.core.errors import PanguLightError

__all__ = [
    "DEFAULT_RIDGE",
    "Refit",
    "bias_compensation",
    "fluctuation",
    "head_fluctuation",
    "refit_projection",
    "stacked_products",
]

DEFAULT_RIDGE = 1e-5


@dataclasses.dataclass
class Refit:
    """New weights for the kept inputs (``weight`` [|K|, out], MatMul layout) and a bias or None."""

    weight: np.ndarray
    bias: np.ndarray | None


def refit_projection(
    gram: np.ndarray,
    total: np.ndarray,
    tokens: int,
    kept: np.ndarray | list[int],
    weight: np.ndarray,
    *,
    ridge: float = DEFAULT_RIDGE,
    intercept: bool = False,
) -> Refit:
    """The ridge least-squares W' (and b' with ``intercept``) above, for the kept inputs ``kept``
    (original numbering) of ``weight`` [in, out], from ``gram`` [in, in], ``total`` = s [in]."""
    gram, weight, kept = _checked(gram, weight, kept)
    if ridge < 0:
        raise PanguLightError(f"ridge must be at least 0 (got {ridge})")
    mean = np.asarray(total, dtype=np.float64) / tokens
    second = gram - tokens * np.outer(mean, mean) if intercept else gram
    lhs = second[np.ix_(kept, kept)].copy()
    lhs[np.diag_indices_from(lhs)] += ridge * float(np.mean(np.diag(gram)[kept]))
    new_weight = _solve_symmetric(lhs, second[kept] @ weight)
    bias = mean @ weight - mean[kept] @ new_weight if intercept else None
    return Refit(new_weight, bias)


def bias_compensation(total: np.ndarray, tokens: int, kept: np.ndarray | list[int], weight: np.ndarray) -> Refit:
    """FLAP: the kept rows of ``weight`` unchanged, b' = mean of the removed inputs times their rows."""
    weight = np.asarray(weight, dtype=np.float64)
    removed = np.setdiff1d(np.arange(weight.shape[0]), np.asarray(kept, dtype=np.int64))
    mean = np.asarray(total, dtype=np.float64) / tokens
    return Refit(weight[np.asarray(kept, dtype=np.int64)], mean[removed] @ weight[removed])


def fluctuation(gram: np.ndarray, total: np.ndarray, tokens: int, weight: np.ndarray) -> np.ndarray:
    """FLAP's score per input j: var_t(x_j) * ||W_j||^2, with ``weight`` [in, out]."""
    mean = np.asarray(total, dtype=np.float64) / tokens
    variance = np.maximum(np.diag(gram) / tokens - mean * mean, 0.0)
    return variance * np.square(np.asarray(weight, dtype=np.float64)).sum(axis=1)


def head_fluctuation(per_input: np.ndarray, head_dim: int) -> np.ndarray:
    """Per head: the fluctuation of its ``head_dim`` consecutive inputs summed."""
    if per_input.size % head_dim:
        raise PanguLightError(f"{per_input.size} inputs do not split into heads of {head_dim}")
    return per_input.reshape(-1, head_dim).sum(axis=1)


def stacked_products(x: np.ndarray, others: list[np.ndarray]) -> list[np.ndarray]:
    """[x^T x, x^T o_1, ...] as float64, from one float32 product (one rounding path: where an o_i
    equals x, its product equals the Gram exactly); rows are tokens."""
    both = (x.T @ np.concatenate([x, *others], axis=1)).astype(np.float64)
    return np.split(both, np.cumsum([x.shape[1], *(o.shape[1] for o in others)])[:-1], axis=1)


def _checked(gram: np.ndarray, weight: np.ndarray, kept) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gram = np.asarray(gram, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    kept = np.asarray(kept, dtype=np.int64)
    width = weight.shape[0]
    if gram.shape != (width, width):
        raise PanguLightError(f"Gram matrix {gram.shape} does not match a weight with {width} inputs")
    if kept.size == 0 or kept.min() < 0 or kept.max() >= width or len(np.unique(kept)) != kept.size:
        raise PanguLightError(f"kept inputs must be distinct indices in 0..{width - 1}")
    return gram, weight, kept


def _solve_symmetric(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """lhs^-1 rhs by an LU solve (LAPACK gesv), never an explicit inverse."""
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        raise PanguLightError(
            "the refit's normal equations are singular (a kept input is zero on every calibration "
            "token); use a ridge above 0"
        ) from None
