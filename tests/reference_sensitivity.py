"""The sensitivity spread as it was before ``align`` (calib/sensitivity.py at 2cfec61, verbatim
but for the imports): the reference ``sensitivity_shape(..., align=1)`` must reproduce exactly."""

from __future__ import annotations

import dataclasses
import heapq

from pangu_light.calib.gram import GramStats
from pangu_light.calib.sensitivity import HEAD_LEVEL_SLACK, _layer_costs
from pangu_light.calib.sensitivity_probe import LayerScales, probe_widths
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import Shape, count_parameters


def unaligned_sensitivity_shape(model_map: ModelMap, stats: CalibrationStats, grams: GramStats | None, shape: Shape,
                      budget: float, scales: LayerScales | None, step: int = 8) -> Shape:
    """``shape`` (a budget's answer) with heads per group and FFN widths spread over the layers by
    cost: the same hidden size, KV groups and dropped layers, at most ``budget`` parameters and
    within 0.5% of it where the FFN floors allow."""
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
    # Floors = the probe's widths: the probe calibrates each cost curve there, and nothing is cut beyond
    # what it measured (a first-order probe says nothing about a layer cut to one head).
    floors = {i: probe_widths(model_map, i) for i in live}
    head_floor = {i: max(1, floors[i][0]) for i in live}
    floor = {i: max(step, floors[i][1]) for i in live}

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
        width = min(step, ffn[i] - floor[i])
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
            width = min(step, ffn[i] - floor[i])
            ffn[i] -= width
            total -= width * unit_params[i][1]
        if (entry := candidate(i, axis)) is not None:
            heapq.heappush(queue, entry)
    if total > budget:
        raise PanguLightError("--spread sensitivity cannot meet the budget within what the layer probe measured "
                              "(one query head fewer per group, half of each FFN); use --spread hidden-light")
    # The last neurons removed can overshoot the budget by up to ``step``: fill the room back.
    while True:
        room = [((costs[i].ffn[ffn[i]] - costs[i].ffn[ffn[i] + width]) / width, -i, width) for i in live
                if (width := min(step, full_ffn[i] - ffn[i], int((budget - total) // unit_params[i][1]))) > 0]
        if not room:
            return current()
        _, i, width = max(room)
        ffn[-i] += width
        total += width * unit_params[-i][1]
