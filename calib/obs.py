"""Refit-aware selection (structured Optimal Brain Surgeon, as ZipLM and SlimGPT use it): remove
the projection inputs whose loss the least-squares refit (``calib.refit``) can best make up for.

A projection y = x W (W [in, out], MatMul layout) with calibration Gram G = sum_t x_t^T x_t. Over
a kept set K, the refit W'_K minimises E(K) = sum_t || x_t,K W'_K - x_t W ||^2 + lambda ||W'_K||^2
(lambda = ridge * mean diag G, as the refit's). Ranking inputs by their own size (S_ffn, S_head,
FLAP's fluctuation) ignores that correlated inputs stand in for each other once the refit runs;
this selection ranks by the error the refit leaves.

Greedy backward elimination in blocks B (one FFN neuron, or the d inputs of a query head). With
H = (G_KK + lambda I)^-1 and W the current refit weights of the kept inputs, removing B raises E
by exactly (OBS)::

    cost(B) = tr( W_B^T (H_BB)^-1 W_B )

and after removing the cheapest block the survivors take over its part of the output::

    W <- W - H_:B (H_BB)^-1 W_B          (the refit of K \\ B, without a new solve)
    H <- H - H_:B (H_BB)^-1 H_B:         ((G + lambda I) over K \\ B, inverted: rows and columns of B
                                          become zero)

so every step costs O(in^2 + in * out), no refactorisation. The order of removal is the ranking:
a block removed later ranks higher. ``groups`` keeps GQA regular: a block may only be removed
while its group holds more than ``keep_per_group`` blocks.

The selection only orders inputs: the kept weights are still computed by ``calib.refit``'s solve
(the same optimum, without the rounding that many rank-one updates accumulate).
"""

from __future__ import annotations

import numpy as np

from pangu_light.calib.refit import DEFAULT_RIDGE
from pangu_light.core.errors import PanguLightError

__all__ = ["elimination_order", "obs_ffn_neurons", "obs_query_heads"]


def elimination_order(
    gram: np.ndarray,
    weight: np.ndarray,
    removals: int,
    *,
    block: int = 1,
    ridge: float = DEFAULT_RIDGE,
    groups: np.ndarray | None = None,
    keep_per_group: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``removals`` blocks of ``block`` consecutive inputs of ``weight`` [in, out] that the
    greedy elimination above removes, in order, and the error E each removal added."""
    gram = np.asarray(gram, dtype=np.float64)
    weight = np.array(weight, dtype=np.float64)
    width = weight.shape[0]
    if gram.shape != (width, width) or width % block:
        raise PanguLightError(f"Gram {gram.shape} and weight {weight.shape}: need [in, in], in a multiple of {block}")
    blocks = width // block
    group_of = np.zeros(blocks, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if group_of.shape != (blocks,):
        raise PanguLightError(f"groups has {group_of.shape[0]} entries for {blocks} blocks")
    left = np.bincount(group_of)
    if removals < 0 or removals > int(np.maximum(left - keep_per_group, 0).sum()) or keep_per_group < 0:
        raise PanguLightError(f"cannot remove {removals} of {blocks} blocks keeping {keep_per_group} per group")
    lhs = gram.copy()
    lhs[np.diag_indices_from(lhs)] += ridge * float(np.mean(np.diag(gram))) + 1e-300
    try:
        inverse = np.linalg.inv(lhs)
    except np.linalg.LinAlgError:
        raise PanguLightError(
            "the Gram matrix is singular (an input is zero on every token); use a ridge above 0") from None
    present = np.arange(blocks)  # the blocks the arrays still hold (compacted as blocks go)
    alive = np.ones(blocks, dtype=bool)  # over ``present``
    order, costs = [], []
    for _ in range(removals):
        if alive.sum() < 0.75 * len(present):  # drop removed rows: later steps cost less
            kept_rows = _rows(np.flatnonzero(alive), block)
            inverse, weight = inverse[np.ix_(kept_rows, kept_rows)], weight[kept_rows]
            present, alive = present[alive], np.ones(int(alive.sum()), dtype=bool)
        candidates = np.flatnonzero(alive & (left[group_of[present]] > keep_per_group))
        cost = _costs(inverse, weight, candidates, block)
        local = int(candidates[int(np.argmin(cost))])
        rows = slice(local * block, (local + 1) * block)
        # H_:B (H_BB)^-1, then the rank-|B| downdates of W and H
        gain = np.linalg.solve(inverse[rows, rows], inverse[rows, :]).T
        weight -= gain @ weight[rows]
        inverse -= gain @ inverse[rows, :]
        weight[rows] = 0.0
        inverse[rows, :] = 0.0
        inverse[:, rows] = 0.0
        alive[local] = False
        chosen = int(present[local])
        left[group_of[chosen]] -= 1
        order.append(chosen)
        costs.append(float(cost.min()))
    return np.asarray(order, dtype=np.int64), np.asarray(costs)


def _rows(blocks: np.ndarray, block: int) -> np.ndarray:
    return (blocks[:, None] * block + np.arange(block)).reshape(-1)


def _costs(inverse: np.ndarray, weight: np.ndarray, candidates: np.ndarray, block: int) -> np.ndarray:
    if block == 1:
        return np.square(weight[candidates]).sum(axis=1) / inverse[candidates, candidates]
    costs = []
    for index in candidates:
        rows = slice(index * block, (index + 1) * block)
        costs.append(float(np.sum(weight[rows] * np.linalg.solve(inverse[rows, rows], weight[rows]))))
    return np.asarray(costs)


def obs_ffn_neurons(gram: np.ndarray, down_weight: np.ndarray, keep: int, *, ridge: float = DEFAULT_RIDGE) -> list[int]:
    """The ``keep`` FFN neurons (down_proj inputs; ``down_weight`` [F, hidden]) the elimination keeps."""
    width = down_weight.shape[0]
    order, _ = elimination_order(gram, down_weight, width - keep, ridge=ridge)
    return sorted(set(range(width)) - set(order.tolist()))


def obs_query_heads(
    gram: np.ndarray, o_weight: np.ndarray, head_dim: int, rep: int, kv_groups: list[int], heads_per_group: int,
    *, ridge: float = DEFAULT_RIDGE,
) -> list[int]:
    """Inside each kept KV group (``kv_groups``; group g holds query heads g*rep .. g*rep+rep-1), the
    ``heads_per_group`` query heads the elimination keeps (o_proj: ``o_weight`` [heads * d, hidden]).
    The Gram and weight are cut to the kept groups' heads first: a removed group's heads are gone
    whatever this chooses, and the refit will not see them."""
    candidates = [g * rep + r for g in sorted(kv_groups) for r in range(rep)]
    inputs = (np.asarray(candidates)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
    order, _ = elimination_order(
        np.asarray(gram)[np.ix_(inputs, inputs)], np.asarray(o_weight)[inputs],
        len(candidates) - heads_per_group * len(kv_groups), block=head_dim, ridge=ridge,
        groups=np.repeat(np.arange(len(kv_groups)), rep), keep_per_group=heads_per_group,
    )
    removed = {candidates[i] for i in order.tolist()}
    return [h for h in candidates if h not in removed]
