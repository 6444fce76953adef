"""Importance statistics, refit Gram matrices and rotation moments from ONE tapped run.

``prune`` needs three things from the unpruned graph on the same calibration sequences: the
importance statistics (``calib.stats``), the o_proj/down_proj input Gram matrices for the refit
(``calib.gram``) and, with ``--hidden-method rotate``, each hidden norm's moment matrix
C_n = sum_t u_t u_t^T of its unit-normalised inputs (``calib.rotation``). Each is a set of taps
(reductions after values the forward pass computes anyway), so one copy of the graph carries all
three and ONNX Runtime runs the forward pass once instead of three times::

    graph --taps(stats)--> tap.*        \\
          --taps(gram)---> gram.*, sum.*  >-- one session, one pass over the batches
          --taps(rot)----> rot.*        /

Every tap is the very subgraph the single-purpose collectors add, over the very same batches,
so each result equals theirs (tests/calib/test_one_pass.py compares them); batches are summed in
float64 as there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pangu_light.calib.gram import PROJECTIONS, GramStats, add_gram_taps
from pangu_light.calib.rotation import add_rotation_taps, rotation_from_moments
from pangu_light.calib.stats import AGGREGATIONS, CalibrationStats, StatsAccumulator
from pangu_light.calib.taps import add_statistic_taps, run_tapped
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.rewrites.rotate_hidden import Rotation

__all__ = ["Collected", "collect_all", "tap_all"]


@dataclass
class Collected:
    stats: CalibrationStats
    grams: GramStats | None
    rotation: Rotation | None
    sequences: np.ndarray | None = None  # the token windows it ran on (set by calibrate.collect_graph_all)


@dataclass
class _Layout:
    stats: list[str]
    grams: dict[tuple[str, str, int], str] | None
    rotation: dict[str, str] | None


def tap_all(model: ir.Model, model_map: ModelMap, *, grams: bool, rotation: bool):
    """Add the statistic taps, and the Gram and rotation taps when asked, in place (use a copy);
    the graph's outputs become all of their outputs. Returns (stats TapLayout, _Layout)."""
    graph = model.graph
    stats_layout = add_statistic_taps(model, model_map)  # each adder replaces the outputs:
    outputs = list(graph.outputs)  # keep every adder's own
    gram_layout = rotation_outputs = None
    if grams:
        gram_layout = add_gram_taps(model, model_map).outputs
        outputs += list(graph.outputs)
    if rotation:
        rotation_outputs = add_rotation_taps(model, model_map)
        outputs += list(graph.outputs)
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    return stats_layout, _Layout(stats_layout.outputs(), gram_layout, rotation_outputs)


def collect_all(
    graph_path: str | os.PathLike,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    grams: bool,
    rotation: bool,
    aggregation: str = "paper",
    provider: str = "cpu",
    threads: int | None = None,
    meta: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Collected:
    """Run one tapped copy of the graph at ``graph_path`` (the file is not modified) over the
    (input_ids, attention_mask) ``batches``: the statistics, and the Gram matrices and the
    rotation when asked."""
    if aggregation not in AGGREGATIONS:
        raise PanguLightError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    model = ir.load(graph_path)
    model_map = ModelMap.from_model(model)
    stats_layout, layout = tap_all(model, model_map, grams=grams, rotation=rotation)
    accumulator = StatsAccumulator(stats_layout)
    layers = len(model_map.layers)
    gram = {p: [0.0] * layers for p in PROJECTIONS}
    sums = {p: [0.0] * layers for p in PROJECTIONS}
    moments: dict[str, np.ndarray] = {}

    def consume(outputs: dict[str, np.ndarray], mask: np.ndarray) -> None:
        accumulator.add({name: outputs[name] for name in layout.stats}, mask)
        for (kind, proj, index), name in (layout.grams or {}).items():
            target = gram if kind == "gram" else sums
            target[proj][index] = target[proj][index] + outputs[name].astype(np.float64)
        for gamma, name in (layout.rotation or {}).items():
            moments[gamma] = moments.get(gamma, 0.0) + outputs[name].astype(np.float64)

    names = [*layout.stats, *(layout.grams or {}).values(), *(layout.rotation or {}).values()]
    providers = run_tapped(model, batches, names, consume, mask_name=stats_layout.mask_name, provider=provider,
                           threads=threads, on_batch=on_batch)
    where = {"graph": str(Path(graph_path).resolve()), "providers": providers}
    stats = accumulator.result(model_map, aggregation, {**where, **(meta or {})})
    return Collected(
        stats,
        GramStats(gram, sums, accumulator.tokens, {**where, **(meta or {})}) if grams else None,
        rotation_from_moments(moments, accumulator.tokens, {**where, **(meta or {})}) if rotation else None,
    )
