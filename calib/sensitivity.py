"""Sensitivity spread: query heads and FFN width per layer where removing them raises the loss least.

A uniform budget gives every layer the same heads per group and the same FFN width; layers are
not equally sensitive. This spread keeps the budget's hidden size and parameter count and moves
heads and FFN neurons to where removing them costs least: the output error the refit
(``calib.refit``) leaves in a layer, times what such an error costs in loss in that layer.

For a projection y = x W (o_proj: x the attention context; down_proj: x = act(gate) * up) with
inputs ranked in the planner's order (query heads: best of every group first, then second best
...; neurons: by S_ffn), C = G / N (``calib.gram``) and C' = C in that order + ridge, Cholesky
C' = L L^T, the least-squares fit of y from the first f inputs leaves, per token::

    R(f) = tr(W^T C W) - sum_{i < f} || (L^-1 C' W')_i ||^2        W' = W in the same order

(Gram-Schmidt of the inputs in ranked order: row i of L^-1 C' W' is what input i explains beyond
the ones before it), so one factorisation gives the error of every width. What an error costs in
layer l is measured by ``calib.sensitivity_probe`` (per layer and projection, scale = the loss
rise of one probe / its R; R alone, or R weighted by Block Influence, spread SmolLM2-135M's budget
onto its first and last layers and did far worse than the uniform spread)::

    cost_l(h, f) = scale_l,o R_o,l(h) + scale_l,down R_down,l(f)

Starting from every head and neuron kept at the budget's hidden size, the unit with the least
cost per parameter freed (one query head in every KV group of a layer, or ``step`` neurons of a
layer) is removed, until the parameter count is within the budget (a head level only while the
count stays within 0.5% of it, so that neurons land it); neurons then fill back what the last step
overshot. No layer is cut beyond the probe's widths (one query head fewer per group, half the FFN):
the probe calibrates each curve there, and on SmolLM2-135M letting layers whose probes barely moved
the loss fall to one head per group and a quarter of the FFN gave 6.3x LAMBADA perplexity where
the uniform spread gives 2.4x.

With ``align`` N > 1 (``prune --align``, whole int4 blocks) every FFN width stays a multiple of N or
the layer's full width: a removal step is whole blocks (``step`` rounded down to blocks, at least
one), except the first from an unaligned full width, which lands on the multiple of N below; the
floor is the probe's width rounded up to a block; the fill adds whole blocks, or what is left up
to the full width. Where no whole block fits under the budget and the count is still more than
``BUDGET_TOLERANCE`` (1%) below it (a narrow model: a block of 8 neurons at hidden 56 is 1% of a
107k budget), one block goes over it, within the same tolerance above, as the planner's budget does.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from pangu_light.calib.budget import BUDGET_TOLERANCE
from pangu_light.calib.gram import GramStats
from pangu_light.calib.refit import DEFAULT_RIDGE
from pangu_light.calib.sensitivity_probe import LayerScales, probe_widths
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import Shape, count_parameters

__all__ = ["FLOORS", "prefix_residuals", "sensitivity_floor", "sensitivity_shape"]

FLOORS = "at most one query head per KV group and half of each layer's FFN"  # what _floors allows, in words
HEAD_LEVEL_SLACK = 0.005  # a head level is removed only if the count stays within this of the budget


def prefix_residuals(gram: np.ndarray, tokens: int, order: np.ndarray, weight: np.ndarray,
                     ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """R(f) for f = 0..n: the per-token output error of the least-squares fit of ``x @ weight``
    ([in, out]) from the first f inputs of ``order`` (``gram`` = sum_t x_t^T x_t, [in, in])."""
    second = np.asarray(gram, dtype=np.float64) / tokens
    weight = np.asarray(weight, dtype=np.float64)
    order = np.asarray(order, dtype=np.int64)
    total = float(np.einsum("io,ij,jo->", weight, second, weight))
    ranked = second[np.ix_(order, order)]
    ranked[np.diag_indices_from(ranked)] += ridge * float(np.mean(np.diag(second)))
    try:
        lower = np.linalg.cholesky(ranked)
    except np.linalg.LinAlgError:
        raise PanguLightError("a projection's Gram matrix is not positive definite even with the ridge; "
                              "recalibrate with more tokens") from None
    explained = np.square(np.linalg.solve(lower, second[order] @ weight)).sum(axis=1)
    return np.maximum(total - np.concatenate([[0.0], np.cumsum(explained)]), 0.0)


def head_order(scores: np.ndarray, groups: int, head_dim: int) -> np.ndarray:
    """o_proj input columns, best head of every group first, then the second best, ..."""
    rep = scores.size // groups
    ranks = np.argsort(-scores.reshape(groups, rep), axis=1, kind="stable")
    heads = [g * rep + int(ranks[g, level]) for level in range(rep) for g in range(groups)]
    return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@dataclasses.dataclass
class _LayerCosts:
    heads: np.ndarray  # cost with h heads per group kept, index h (0 unused)
    ffn: np.ndarray  # cost with f neurons kept, index f


def _layer_costs(model_map: ModelMap, stats: CalibrationStats, grams: GramStats, scales: LayerScales,
                 index: int) -> _LayerCosts:
    layer = model_map.layer(index)
    attention = layer.attention
    o_weight = attention.o.weight.const_value.numpy().T
    down_weight = layer.ffn.down.weight.const_value.numpy().T
    order = head_order(stats.heads[index], attention.num_kv_heads, attention.head_dim)
    o_costs = prefix_residuals(grams.gram["o"][index], grams.tokens, order, o_weight)
    down_costs = prefix_residuals(grams.gram["down"][index], grams.tokens,
                                  np.argsort(-stats.ffn[index], kind="stable"), down_weight)
    per_level = attention.num_kv_heads * attention.head_dim
    heads_kept, ffn_kept = probe_widths(model_map, index)

    def scale(proj: str, costs: np.ndarray, kept: int) -> float:  # loss rise per unit of refit error
        return scales.loss_rise(proj, index) / costs[kept] if kept >= 1 and costs[kept] > 0 else 0.0

    return _LayerCosts(heads=scale("o", o_costs, heads_kept * per_level) * o_costs[::per_level],
                       ffn=scale("down", down_costs, ffn_kept) * down_costs)


def sensitivity_shape(model_map: ModelMap, stats: CalibrationStats, grams: GramStats | None, shape: Shape,
                      budget: float, scales: LayerScales | None, step: int = 8, align: int = 1) -> Shape:
    """``shape`` (a budget's answer) with heads per group and FFN widths spread over the layers by
    cost: the same hidden size, KV groups and dropped layers, at most ``budget`` parameters and
    within 0.5% of it where the FFN floors allow. ``align`` > 1: every FFN width a multiple of it
    or the layer's full width, and the count within ``BUDGET_TOLERANCE`` of the budget (one block
    over it where no block fits under it closer)."""
    if grams is None or scales is None:
        raise PanguLightError("--spread sensitivity needs the refit's Gram statistics and the layer probe, which "
                              "prune measures (with its default --refit refit); use --spread hidden-light otherwise")
    if grams.num_layers != len(model_map.layers):
        raise PanguLightError(f"the Gram file has {grams.num_layers} layers, the graph {len(model_map.layers)}")
    live = [l.index for l in model_map.layers if l.index not in shape.dropped]
    full_groups = {i: model_map.layer(i).attention.num_kv_heads for i in live}
    if any(shape.kv_groups[i] != full_groups[i] for i in live):
        raise PanguLightError("--spread sensitivity moves query heads and FFN neurons, not KV groups; "
                              "keep every KV group or use --spread hidden-light")
    costs = {i: _layer_costs(model_map, stats, grams, scales, i) for i in live}
    full_heads = {i: model_map.layer(i).attention.num_heads // full_groups[i] for i in live}
    heads = dict(full_heads)
    full_ffn = {i: model_map.layer(i).ffn.intermediate_size for i in live}
    ffn = dict(full_ffn)
    step = _removal_step(step, align)
    head_floor, floor = _floors(model_map, live, step, align)

    def lower(i: int) -> int:  # the next FFN width down: ``step`` fewer, rounded up to a block, not below the floor
        return max(floor[i], _round_up(ffn[i] - step, align))

    def upper(i: int, most: int) -> int:  # the next width up by at most min(step, most): the full width or a block
        grown = ffn[i] + min(step, most)
        return full_ffn[i] if grown >= full_ffn[i] else align * (grown // align)

    def current() -> Shape:
        return dataclasses.replace(
            shape, heads_per_group=[heads.get(i, h) for i, h in enumerate(shape.heads_per_group)],
            ffn=[ffn.get(i, f) for i, f in enumerate(shape.ffn)])

    probe = current()
    unit_params = {}
    for i in live:  # parameters freed by one head level / one neuron of layer i (linear in both)
        fewer = dataclasses.replace(probe, heads_per_group=list(probe.heads_per_group), ffn=list(probe.ffn))
        fewer.heads_per_group[i] -= 1
        fewer.ffn[i] -= 1
        both = count_parameters(model_map, probe) - count_parameters(model_map, fewer)
        fewer.heads_per_group[i] += 1
        neuron = count_parameters(model_map, probe) - count_parameters(model_map, fewer)
        unit_params[i] = (both - neuron, neuron)

    def candidate(i: int, axis: str) -> tuple[float, int, str] | None:
        c = costs[i]
        if axis == "heads":
            if heads[i] <= head_floor[i]:
                return None
            return ((c.heads[heads[i] - 1] - c.heads[heads[i]]) / unit_params[i][0], i, axis)
        width = ffn[i] - lower(i)
        if width <= 0:
            return None
        return ((c.ffn[ffn[i] - width] - c.ffn[ffn[i]]) / (width * unit_params[i][1]), i, axis)

    queue = [entry for i in live for axis in ("heads", "ffn") if (entry := candidate(i, axis))]
    heapq.heapify(queue)
    total = count_parameters(model_map, probe)
    while total > budget and queue:
        _, i, axis = heapq.heappop(queue)
        if axis == "heads" and total - unit_params[i][0] < budget * (1 - HEAD_LEVEL_SLACK):
            continue  # a whole head level would overshoot the budget: the finer neurons finish it
        if axis == "heads":
            heads[i] -= 1
            total -= unit_params[i][0]
        else:
            width = ffn[i] - lower(i)
            ffn[i] -= width
            total -= width * unit_params[i][1]
        if (entry := candidate(i, axis)) is not None:
            heapq.heappush(queue, entry)
    if total > budget:
        raise PanguLightError("--spread sensitivity cannot meet the budget within what the layer probe measured "
                              f"({FLOORS}); use --spread hidden-light")
    def growth(i: int, width: int) -> tuple[float, int, int]:  # loss saved per neuron given back (ties: lower i)
        return ((costs[i].ffn[ffn[i]] - costs[i].ffn[ffn[i] + width]) / width, -i, width)

    # The last neurons removed can overshoot the budget by up to ``step``: fill the room back (in blocks).
    while True:
        room = [growth(i, width) for i in live
                if (width := upper(i, int((budget - total) // unit_params[i][1])) - ffn[i]) > 0]
        if not room:
            break
        _, i, width = max(room)
        ffn[-i] += width
        total += width * unit_params[-i][1]
    if align > 1 and total < budget * (1 - BUDGET_TOLERANCE):  # no whole block fits under the budget:
        over = [growth(i, width) for i in live
                if 0 < (width := upper(i, align) - ffn[i]) and total + width * unit_params[i][1]
                <= budget * (1 + BUDGET_TOLERANCE)]  # one block over it, within the planner's tolerance
        if over:
            _, i, width = max(over)
            ffn[-i] += width
    return current()


def _removal_step(step: int, align: int) -> int:
    """FFN neurons one removal takes: ``step``, or with ``align`` > 1 as many whole blocks as fit in
    it (at least one)."""
    return align * max(1, step // align) if align > 1 else step


def _floors(model_map: ModelMap, live: list[int], step: int, align: int) -> tuple[dict[int, int], dict[int, int]]:
    """(query heads per group, FFN width) below which no live layer is cut: the probe's widths (the
    probe calibrates each cost curve there, and nothing is cut beyond what it measured: a first-order
    probe says nothing about a layer cut to one head), the FFN floor rounded up to a removal step."""
    widths = {i: probe_widths(model_map, i) for i in live}
    return ({i: max(1, widths[i][0]) for i in live},
            {i: min(model_map.layer(i).ffn.intermediate_size, _round_up(max(step, widths[i][1]), align))
             for i in live})


def sensitivity_floor(model_map: ModelMap, shape: Shape, step: int = 8, align: int = 1) -> Shape:
    """The smallest shape ``sensitivity_shape`` can reach from ``shape`` (every live layer at its
    floors): a budget below its parameter count cannot be met by this spread, which ``prune`` checks
    before it spends the probe's model runs."""
    live = [l.index for l in model_map.layers if l.index not in shape.dropped]
    heads, ffn = _floors(model_map, live, _removal_step(step, align), align)
    return dataclasses.replace(
        shape, heads_per_group=[heads.get(i, h) for i, h in enumerate(shape.heads_per_group)],
        ffn=[ffn.get(i, f) for i, f in enumerate(shape.ffn)])


def _round_up(width: int, align: int) -> int:
    return align * -(-width // align)
