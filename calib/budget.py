"""The shape a set of targets resolves to: fixed widths as given, and a parameter budget spread
over the widths nobody gave.

A budget (``params``: a fraction of the current parameter count) is met by one factor r in
[0, 1], found by bisection: each width w shrinks to ``w (1 - share (1 - r))`` with its axis's
share (``Targets.spread``); then the FFN width, the finest axis, is solved for exactly, so the
plan lands within 1% of the budget.

    hidden-light  (the planner's and plan's default; prune's is ``auto``, below) FFN share 1, query
                  heads per group 3/4, hidden size 1/5: the FFN width takes most of the cut.
                  One-shot pruning hurts the hidden size most
                  (it narrows every layer's input and output and the embedding) and one query
                  head of three per group much more than two; measured on SmolLM2-135M with
                  rotate + refit, LAMBADA / wiki perplexity x unpruned (benchmarks/budget_spread.py):
                  --params 0.8: one factor for all (hidden 480, FFN 1440) 2.97x / 2.68x, hidden
                  576 with heads 2 of 3 and FFN 1152: 2.44x / 2.11x; --params 0.62: one factor
                  (hidden 416, heads 2, FFN 1312) 9.61x / 9.29x, hidden 544 (heads 2, FFN 768)
                  5.61x / 4.35x, hidden 576 (heads 1, FFN 800) 13.3x / 7.1x;
    even          every share 1: every width by the same factor (the first version's rule);
    sensitivity   hidden-light's hidden size; query heads and FFN width then moved between layers
                  to where the refit loses least (calib.sensitivity; needs the Gram statistics and
                  the layer probe, which prune runs);
    auto          prune's default (``resolve_spread``): sensitivity where it applies, else
                  hidden-light.

Where hidden-light cannot meet the budget (below what it reaches, no aligned width lands within
1%, or the FFN would keep less than a quarter of its width), the even spread is used. ``align``
rounds hidden and FFN widths to multiples of N.
"""

from __future__ import annotations

import dataclasses
import math

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import Shape, count_parameters, shape_of

__all__ = ["AUTO_SPREAD", "BUDGET_TOLERANCE", "SPREADS", "resolve_shape", "resolve_spread"]

BUDGET_TOLERANCE = 0.01
MIN_FFN_FRACTION = 0.25  # hidden-light never leaves the FFN less than this (else: even)
SPREADS = {  # spread -> (hidden share, heads-per-group share); the FFN's share is 1
    "hidden-light": (0.2, 0.75),
    "even": (1.0, 1.0),
    "sensitivity": (0.2, 0.75),  # hidden-light's hidden size; heads and FFN then by calib.sensitivity
}


AUTO_SPREAD = "auto"  # prune's default: sensitivity where it applies, else hidden-light (resolve_spread)


def resolve_spread(requested: str, targets, *, refit: bool, probe: bool = True) -> str:
    """``requested`` with ``auto`` made concrete: ``sensitivity`` for a ``--params`` budget whose heads
    and FFN widths nobody gave (no ``--uniform``, no post-norm absorption), where the refit's Gram
    statistics (``refit``) and the layer probe (``probe``: prune runs it, plan cannot) are at hand;
    else ``hidden-light``. Any other name is returned as it is. Measured on SmolLM2-135M at
    ``prune --params 0.8`` (wiki+lambada calibration), LAMBADA perplexity 1.70x the unpruned model's
    with hidden-light and 1.44x with sensitivity (its default 4 x 256-token probe; docs in the README)."""
    if requested != AUTO_SPREAD:
        return requested
    applies = (targets.params is not None and not targets.uniform and targets.heads_per_group is None
               and targets.ffn is None and targets.kv_groups is None and not targets.absorb_post_norms)
    return "sensitivity" if applies and refit and probe else "hidden-light"


def _per_layer(value: int | list[int] | None, default: list[int], what: str, limit: list[int]) -> list[int] | None:
    if value is None:
        return None
    values = [value] * len(default) if isinstance(value, int) else list(value)
    if len(values) != len(default):
        raise PanguLightError(f"{what}: {len(values)} values for {len(default)} layers")
    for index, (v, most) in enumerate(zip(values, limit)):
        if not 1 <= v <= most:
            raise PanguLightError(f"{what}={v} for layer {index}: it has {most}; keep between 1 and {most}")
    return values


def _align(width: float, align: int, most: int) -> int:
    return int(min(most, max(align, align * round(width / align))))


def resolve_shape(model_map: ModelMap, targets, dropped: set[int]) -> Shape:
    """The shape ``targets`` (a ``planner.Targets``) give with the layers ``dropped``."""
    full = shape_of(model_map)
    if targets.hidden is not None and not 1 <= targets.hidden <= full.hidden:
        raise PanguLightError(
            f"hidden={targets.hidden}: the model has {full.hidden} channels; keep between 1 and {full.hidden}"
        )
    fixed_heads = _per_layer(targets.heads_per_group, full.heads_per_group, "heads per group", full.heads_per_group)
    fixed_groups = _per_layer(targets.kv_groups, full.kv_groups, "KV groups", full.kv_groups)
    fixed_ffn = _per_layer(targets.ffn, full.ffn, "FFN width", full.ffn)
    if targets.uniform:
        for values, what in ((fixed_heads, "heads per group"), (fixed_groups, "KV groups"), (fixed_ffn, "FFN width")):
            if values is not None and len(set(values)) > 1:
                raise PanguLightError(f"--uniform: {what} differs between layers ({values})")

    # the targets' model-free errors (spread name, --params range) are Targets.check's, run first
    if targets.spread == "sensitivity" and (targets.params is None or targets.uniform or fixed_heads or fixed_ffn):
        raise PanguLightError("--spread sensitivity spreads a --params budget's heads and FFN width over the layers: "
                              "give --params, and neither --uniform, --heads-per-group nor --ffn")

    def shape_at(r: float, shares: tuple[float, float]) -> Shape:
        hidden_fraction, heads_fraction = (1 - share * (1 - r) for share in shares)
        heads_per_group = fixed_heads or [max(1, round(heads_fraction * n)) for n in full.heads_per_group]
        kv_groups = fixed_groups or list(full.kv_groups)
        hidden_align = targets.align
        # transformers (5.x) refuses these configs unless hidden_size % num_attention_heads == 0, even
        # with an explicit head_dim; --uniform promises a loadable standard config, so it keeps that.
        if targets.uniform and model_map.family in contract.HEADS_DIVIDE_HIDDEN:
            hidden_align = math.lcm(targets.align, heads_per_group[0] * kv_groups[0])
        hidden = (targets.hidden if targets.hidden is not None
                  else _align(hidden_fraction * full.hidden, hidden_align, full.hidden))
        if (targets.uniform and model_map.family in contract.HEADS_DIVIDE_HIDDEN
                and hidden % (heads_per_group[0] * kv_groups[0])):
            raise PanguLightError(
                f"--uniform: hidden={hidden} is not a multiple of the {heads_per_group[0] * kv_groups[0]} query heads "
                "kept per layer, which a Hugging Face config requires; choose a multiple"
            )
        return Shape(
            hidden=hidden,
            heads_per_group=heads_per_group,
            kv_groups=kv_groups,
            ffn=fixed_ffn or [_align(r * f, targets.align, f) for f in full.ffn],
            dropped=dropped,
        )

    if targets.params is None:
        return shape_at(1.0, SPREADS["even"])
    before = count_parameters(model_map, full)
    budget = targets.params * before

    def within(shape: Shape) -> bool:
        return abs(count_parameters(model_map, shape) - budget) <= BUDGET_TOLERANCE * budget

    def solve_ffn(shape: Shape) -> Shape:
        if fixed_ffn is None:  # solve the FFN width (same in every layer) for the budget exactly
            without = count_parameters(model_map, dataclasses.replace(shape, ffn=[0] * len(full.ffn)))
            unit = count_parameters(model_map, dataclasses.replace(shape, ffn=[1] * len(full.ffn))) - without
            width = (budget - without) / unit if unit else 0
            shape.ffn = [_align(width, targets.align, f) for f in full.ffn]
        return shape

    def solve(shares: tuple[float, float]) -> Shape:
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if count_parameters(model_map, shape_at(mid, shares)) <= budget else (low, mid)
        shape = solve_ffn(shape_at(low, shares))
        # Aligned widths move in steps that can jump over the 1% window: a slightly smaller r
        # (a narrower hidden size or fewer heads) leaves the FFN width more room to land in it.
        for step in range(1, 41):
            if within(shape) or low - 0.005 * step < 0:
                break
            shape = solve_ffn(shape_at(low - 0.005 * step, shares))
        return shape

    spread = SPREADS[targets.spread]
    if spread != SPREADS["even"] and count_parameters(model_map, shape_at(0.0, spread)) <= budget:
        shape = solve(spread)
        if within(shape) and min(w / f for w, f in zip(shape.ffn, full.ffn)) >= MIN_FFN_FRACTION:
            return shape
    smallest = shape_at(0.0, SPREADS["even"])  # the even spread: below a light cut, or where it cannot land
    if count_parameters(model_map, smallest) > budget * (1 + BUDGET_TOLERANCE):
        embedding = model_map.vocab_size * smallest.hidden
        raise PanguLightError(
            f"--params {targets.params}: a budget of {budget:,.0f} parameters is below the smallest model these "
            f"targets allow ({count_parameters(model_map, smallest):,}; the {model_map.vocab_size}-token embedding "
            f"alone holds {embedding:,} at hidden {smallest.hidden}); raise the budget or drop more layers"
        )
    shape = solve(SPREADS["even"])
    if not within(shape):
        got = count_parameters(model_map, shape)
        raise PanguLightError(
            f"--params {targets.params}: the closest plan has {got:,} parameters ({got / before:.3f} of {before:,}); "
            f"the fixed targets leave too little room: relax --hidden/--heads-per-group/--kv-groups/--ffn or --align"
        )
    return shape
