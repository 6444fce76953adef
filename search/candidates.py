"""Candidate shapes for the search, and the shape key that names a shape's structure.

A candidate is a set of planner ``Targets``; the planner (``calib.planner.make_plan``) turns it
into a plan with the real statistics. Two families of candidates:

    uniform   hidden x FFN width x query heads per group x KV groups x layers dropped, the same
              shape in every kept layer (a grid of fractions of the model's own widths);
    spread    ``--params F`` at a few levels: the planner's per-layer spread of one budget
              (with and without dropped layers).

Widths are rounded to multiples of ``align`` (the planner's rounding); the search measures
whether that matters rather than assuming it.

What a graph costs to run depends only on its structure, never on which indices were kept or
which layers were dropped: ``shape_key`` is the hidden size and, per kept layer in order, (KV
groups, query heads per group, FFN width). Latencies are cached under that key.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import count_parameters, shape_of
from pangu_light.passes.infra.plan import PrunePlan

__all__ = ["Candidate", "generate_candidates", "shape_key", "shape_of_plan"]

HIDDEN_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)
FFN_FRACTIONS = (1.0, 0.75, 0.5)
DROP_FRACTIONS = (0.0, 1 / 6, 1 / 3)
PARAMS_LEVELS = (0.8, 0.65, 0.5)


@dataclasses.dataclass
class Candidate:
    """One shape: its label, the targets that made it, its plan, key and parameter count."""

    label: str
    kind: str  # "uniform" or "spread"
    targets: Targets
    plan: PrunePlan
    key: str
    parameters: int
    parameter_ratio: float

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "parameters": self.parameters,
                "parameter_ratio": round(self.parameter_ratio, 4), "shape": json.loads(self.key)}


def shape_of_plan(plan: PrunePlan) -> dict[str, Any]:
    """Hidden size and, per kept layer in order, [KV groups, query heads per group, FFN width]."""
    dropped = set(plan.drop_layers)
    layers = []
    for layer in plan.layers:
        if layer.index in dropped:
            continue
        groups = len(layer.kv_groups)
        layers.append([groups, len(layer.heads) // groups, len(layer.ffn)])
    for merge in plan.clap_merges:  # a CLAP receiver runs the merged groups
        kept = [l.index for l in plan.layers if l.index not in dropped]
        layers[kept.index(merge.into)][0] = len(merge.groups)
    return {"hidden": len(plan.hidden), "layers": layers}


def shape_key(plan: PrunePlan) -> str:
    return json.dumps(shape_of_plan(plan), separators=(",", ":"))


def _aligned(fraction: float, full: int, align: int) -> int:
    if fraction >= 1.0:
        return full
    return int(min(full, max(align, align * round(fraction * full / align))))


def generate_candidates(
    model_map: ModelMap, stats: CalibrationStats, *, align: int = 32,
    hidden_fractions=HIDDEN_FRACTIONS, ffn_fractions=FFN_FRACTIONS, drop_fractions=DROP_FRACTIONS,
    params_levels=PARAMS_LEVELS, hidden_method: str = "select", rotation=None, rotation_file: str | None = None,
) -> list[Candidate]:
    """Every distinct candidate (by shape key; the first label wins), the unpruned shape left out.
    ``hidden_method`` rotate (with ``rotation`` saved at ``rotation_file``) cuts the hidden size
    by the leading components of the rotation, as ``prune --hidden-method rotate`` does."""
    full = shape_of(model_map)
    n_layers = len(model_map.layers)
    heads = sorted({max(full.heads_per_group), max(1, round(max(full.heads_per_group) * 2 / 3))}, reverse=True)
    groups = sorted({max(full.kv_groups), max(1, max(full.kv_groups) - 1)}, reverse=True)
    drops = sorted({min(n_layers - 1, round(f * n_layers)) for f in drop_fractions})
    before = count_parameters(model_map, full)
    found: dict[str, Candidate] = {}

    def add(label: str, kind: str, targets: Targets) -> None:
        try:
            targets = dataclasses.replace(targets, hidden_method=hidden_method)
            plan = make_plan(model_map, stats, targets, rotation=rotation, rotation_file=rotation_file)
        except PanguLightError:
            return  # a combination the planner cannot meet (e.g. a budget below the embedding)
        key = shape_key(plan)
        after = int(plan.estimate["parameters_after"])
        if key not in found and after < before:
            found[key] = Candidate(label, kind, targets, plan, key, after, after / before)

    for h, f, g, k, d in itertools.product(hidden_fractions, ffn_fractions, heads, groups, drops):
        hidden = _aligned(h, full.hidden, align)
        ffn = _aligned(f, max(full.ffn), align)
        label = f"h{hidden}-f{ffn}-g{g}x{k}-L{n_layers - d}"
        add(label, "uniform", Targets(hidden=hidden, ffn=ffn, heads_per_group=g, kv_groups=k,
                                      drop_layers=d or None, align=align))
    for p, d in itertools.product(params_levels, drops[:2]):
        add(f"params{p:g}-L{n_layers - d}", "spread", Targets(params=p, drop_layers=d or None, align=align))
    return list(found.values())
