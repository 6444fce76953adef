"""The planner: calibration statistics + targets -> a PrunePlan (which indices survive).

Choices, each by the statistics of ``calib.stats`` (higher = more important):

- hidden channels: the top ``hidden`` channels by S_channel, one global ranking (eq. 1); or, with
  ``hidden_method`` rotate, the leading ``hidden`` components of a rotation (``calib.rotation``:
  the ``rotate-hidden`` pass), with each norm's RMS correction recorded;
- KV groups of a layer: the top ``kv_groups`` groups by the mean S_head of their query heads;
- query heads: inside every kept group, the top ``heads_per_group`` heads by S_head (eq. 2),
  so every group of a layer keeps the same number and GQA stays regular;
- FFN neurons: per layer the top ``ffn`` neurons by S_ffn (eq. 3). When a budget sets the
  width and ``uniform`` is off, the same total is spread over the layers by one ranking of
  the neurons' scores divided by their layer's mean score (raw scores grow with depth,
  which would starve the first layers);
- ``selection`` obs / obs-ffn / obs-heads: the widths as above, then who fills them is chosen
  again by the refit-aware elimination of ``calib.obs`` (the o_proj/down_proj Grams);
- layers: the ``drop_layers`` layers with the lowest Block Influence (eq. 4), or named ones;
- CLAP (3.2.1): each removed layer merges into the nearest kept layer before it (a removed
  first layer: the next kept one); the KV groups of the kept layer and of all layers merging
  into it are ranked together by the mean S_head of their surviving heads (eq. 5) and the top
  K are kept, K = the kept layer's own count (``clap_groups``: or all of them, or N). Only
  layers of the receiver's attention type (same rotary, mask: not Gemma's sliding vs global)
  and heads per group contribute. Variants: ``clap_margin`` ranks the receiver's
  own groups ``margin`` times higher, ``clap_adjacent`` merges only the removed layer next
  to its receiver;
- SLNP (eq. 6) scales ||gamma_orig|| / ||gamma_kept|| are written for every hidden norm;
- post-norm absorption (eq. 8): the calibrated s_inv of every post-norm.

A parameter budget (``params``: a fraction of the current count) fixes the widths nobody
gave (``calib.budget``: heads and FFN by one factor, the hidden size more gently, then the FFN
width solved for the budget exactly). ``align`` rounds hidden and FFN widths to multiples of N (each
layer's spread FFN width too: largest remainders keep the total).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pangu_light.calib.budget import AUTO_SPREAD, SPREADS, resolve_shape
from pangu_light.calib.obs import obs_ffn_neurons, obs_query_heads
from pangu_light.calib.rotation import plan_rotation
from pangu_light.calib.sensitivity import FLOORS, sensitivity_floor, sensitivity_shape
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.attention_context import attention_context
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import Shape, count_parameters, shape_of
from pangu_light.passes.infra.plan import ClapMerge, PrunePlan

__all__ = ["SELECTIONS", "Targets", "make_plan", "reachable_spread", "sensitivity_reaches"]

SELECTIONS = ("scores", "obs", "obs-ffn", "obs-heads")



@dataclasses.dataclass
class Targets:
    """What to keep. ``None`` = keep all (or, with ``params``, let the budget decide)."""

    hidden: int | None = None
    heads_per_group: int | list[int] | None = None
    kv_groups: int | list[int] | None = None
    ffn: int | list[int] | None = None
    drop_layers: int | None = None  # how many, chosen by Block Influence
    layers: list[int] | None = None  # or exactly which
    params: float | None = None  # budget: fraction of the current parameter count
    uniform: bool = False
    align: int = 1
    clap: bool = False
    clap_groups: int | str = "keep"  # KV groups of a merged layer: "keep" (its own count), "sum" (all), or N
    clap_margin: float = 1.0  # a removed layer's group must outscore a receiver's own group by this factor
    clap_adjacent: bool = False  # only the removed layer next to its receiver merges (the rest: plain removal)
    slnp: bool = True
    absorb_post_norms: bool = False
    absorb_max_spread: float | None = None  # absorb only post-norms whose log 1/rms spread is at most this
    hidden_method: str = "select"  # "select" (S_channel) or "rotate" (leading components of a rotation)
    spread: str = "hidden-light"  # how a budget shrinks the widths nobody gave (calib.budget)
    selection: str = "scores"  # which heads/neurons fill the widths: "scores" (S_head, S_ffn) or "obs" (calib.obs)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def check(self) -> None:
        """The errors that need no model: raised before any export or calibration is paid for."""
        if self.params is not None and not 0 < self.params <= 1:
            raise PanguLightError(f"--params {self.params}: give the fraction of parameters to keep, in (0, 1]")
        if self.align < 1:
            raise PanguLightError(f"--align must be at least 1 (got {self.align})")
        if self.spread not in SPREADS:
            raise PanguLightError(f"--spread {self.spread!r}: use one of {', '.join(SPREADS)}")
        if self.drop_layers is not None and self.drop_layers < 0:
            raise PanguLightError(f"cannot drop {self.drop_layers} layers")
        if self.layers is not None and self.drop_layers is not None:
            raise PanguLightError("give either the number of layers to drop or which layers, not both")
        if self.hidden is not None and self.hidden < 1:
            raise PanguLightError(f"hidden={self.hidden}: keep at least 1 channel")
        if self.selection not in SELECTIONS:
            raise PanguLightError(f"--selection {self.selection!r}: use one of {', '.join(SELECTIONS)}")


# ------------------------------------------------------------------------------ the plan


def sensitivity_reaches(model_map: ModelMap, stats: CalibrationStats, targets: Targets) -> bool:
    """Whether ``--spread sensitivity`` can meet ``targets``' budget within its floors (one query head
    fewer per group, half of each FFN, at the hidden size and dropped layers ``make_plan`` would use).
    It cannot where most parameters sit outside the layers: Gemma-3-270M's embedding is 63% of it,
    so ``--params 0.7`` needs more than the layers' floors free."""
    shape = resolve_shape(model_map, targets, _layers_to_drop(model_map, stats, targets))
    floor = sensitivity_floor(model_map, shape, align=targets.align)
    return count_parameters(model_map, floor) <= targets.params * count_parameters(model_map, shape_of(model_map))


def reachable_spread(model_map: ModelMap, stats: CalibrationStats, targets: Targets, requested: str) -> str:
    """``targets.spread``, except where it is the sensitivity spread and cannot reach the budget: then
    ``hidden-light`` if ``--spread auto`` chose it (``requested``), else a PanguLightError; checked from
    the statistics alone, before the layer probe."""
    if targets.spread != "sensitivity" or sensitivity_reaches(model_map, stats, targets):
        return targets.spread
    if requested != AUTO_SPREAD:
        raise PanguLightError(
            f"--spread sensitivity cannot reach --params {targets.params}: it cuts {FLOORS}, and most of this "
            "model's parameters are outside them; use --spread hidden-light, which cuts the hidden size too")
    return "hidden-light"


def make_plan(model_map: ModelMap, stats: CalibrationStats, targets: Targets, *, rotation=None,
              rotation_file: str | None = None, grams=None, layer_scales=None) -> PrunePlan:
    """Turn ``targets`` into a validated plan; impossible targets are PanguLightErrors. ``rotation``
    (a ``rotate_hidden.Rotation``, saved at ``rotation_file``) is needed with hidden_method rotate,
    ``grams`` (``calib.gram.GramStats`` of this graph) and ``layer_scales`` (its
    ``calib.sensitivity_probe.LayerScales``) with spread sensitivity."""
    _check_stats(model_map, stats)
    targets.check()
    dropped = _layers_to_drop(model_map, stats, targets)
    shape = resolve_shape(model_map, targets, dropped)
    if targets.spread == "sensitivity":
        shape = sensitivity_shape(model_map, stats, grams, shape,
                                  targets.params * count_parameters(model_map, shape_of(model_map)), layer_scales,
                                  align=targets.align)
    plan = PrunePlan.identity(model_map)
    plan.hidden = _top(stats.channel, shape.hidden)
    if targets.hidden_method == "rotate":
        plan_rotation(plan, model_map, shape.hidden, rotation, rotation_file)
    elif targets.hidden_method != "select":
        raise PanguLightError(f"hidden method {targets.hidden_method!r}: use select or rotate")
    for layer, layer_plan in zip(model_map.layers, plan.layers):
        heads = stats.heads[layer.index]
        rep = layer.attention.num_heads // layer.attention.num_kv_heads
        group_scores = heads.reshape(layer.attention.num_kv_heads, rep).mean(axis=1)
        layer_plan.kv_groups = _top(group_scores, shape.kv_groups[layer.index])
        layer_plan.heads = sorted(
            g * rep + int(r)
            for g in layer_plan.kv_groups
            for r in _top(heads[g * rep : (g + 1) * rep], shape.heads_per_group[layer.index])
        )
    # a width the user gave, or the sensitivity spread chose, is kept per layer
    spread_ffn = not targets.uniform and targets.ffn is None and targets.spread != "sensitivity"
    for index, keep in _ffn_choice(model_map, stats, shape, not spread_ffn, targets.align).items():
        plan.layers[index].ffn = keep
    if targets.selection.startswith("obs"):
        _select_by_obs(model_map, plan, grams, targets.selection)
    plan.drop_layers = sorted(dropped)
    plan.clap = targets.clap
    if targets.clap and dropped:
        plan.clap_merges = clap_merges(
            model_map, stats, plan,
            groups=targets.clap_groups, margin=targets.clap_margin, adjacent=targets.clap_adjacent,
        )
        for merge in plan.clap_merges:  # the merged layer's size, for the estimate
            shape.kv_groups[merge.into] = len(merge.groups)
    plan.slnp = targets.slnp
    plan.slnp_scales = {} if plan.hidden_method == "rotate" else _slnp_scales(model_map, plan.hidden)
    plan.absorb_post_norms = targets.absorb_post_norms
    plan.post_norm_s_inv = dict(stats.s_inv)
    if targets.absorb_post_norms and not stats.s_inv:
        raise PanguLightError("--absorb-post-norms: this model has no post-norms (it is not a sandwich-norm model)")
    plan.post_norm_keep = _post_norms_kept(stats, targets)
    before = count_parameters(model_map, shape_of(model_map))
    after = count_parameters(model_map, shape)
    plan.targets = targets.to_json()
    plan.source = {"stats": dict(stats.meta), "calibration_tokens": stats.tokens}
    plan.estimate = {
        "parameters_before": before,
        "parameters_after": after,
        "parameter_ratio": round(after / before, 6),
        "hidden": shape.hidden,
        "heads_per_group": _compact(shape.heads_per_group, dropped),
        "kv_groups": _compact(shape.kv_groups, dropped),
        "ffn": _compact(shape.ffn, dropped),
        "layers": len(model_map.layers) - len(dropped),
    }
    plan.validate("the new plan")
    return plan


def clap_merges(
    model_map: ModelMap,
    stats: CalibrationStats,
    plan: PrunePlan,
    *,
    groups: int | str = "keep",
    margin: float = 1.0,
    adjacent: bool = False,
) -> list[ClapMerge]:
    """Eq. 5: per kept layer receiving removed layers, the top-K KV groups over all of them.

    Each removed layer merges into the nearest kept layer before it (removed first layers:
    the first kept layer). Candidates are the groups ``plan`` keeps, scored by the mean S_head
    of the heads it keeps in them; a removed layer contributes only if its attention reads the
    receiver's rotary embedding and mask (``passes.clap.attention_context``: no Gemma sliding
    <-> global moves) and keeps as many heads per group. ``groups``: K = "keep" (the
    receiver's own count), "sum" (every candidate) or N. ``margin``: the receiver's own
    groups rank with their score times ``margin`` (1.5: a moved group must score 1.5x
    higher). ``adjacent``: only a removed layer next to its receiver contributes. One
    ClapMerge per contributing removed layer; the others are removed plainly."""
    if not (groups in ("keep", "sum") or (isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1)):
        raise PanguLightError(
            f"CLAP groups={groups!r}: give \"keep\" (the receiver's own count), \"sum\" (every candidate group) "
            "or a number of KV groups >= 1"
        )
    if not (isinstance(margin, (int, float)) and margin > 0 and math.isfinite(margin)):
        raise PanguLightError(f"CLAP margin={margin!r}: give a positive factor (1.0 is the paper's plain ranking)")
    dropped = set(plan.drop_layers)
    kept = [l.index for l in model_map.layers if l.index not in dropped]
    receivers: dict[int, list[int]] = {}
    for index in sorted(dropped):
        before = [k for k in kept if k < index]
        receivers.setdefault(before[-1] if before else kept[0], []).append(index)

    def heads_per_group(index: int) -> int:
        return len(plan.layers[index].heads) // len(plan.layers[index].kv_groups)

    def candidates(index: int, weight: float = 1.0) -> list[tuple[float, int, int]]:
        layer_plan = plan.layers[index]
        rep = plan.shapes[index].heads_per_group
        scores = stats.heads[index]
        out = []
        for group in layer_plan.kv_groups:
            surviving = [h for h in layer_plan.heads if h // rep == group]
            out.append((weight * float(np.mean(scores[surviving])), index, group))
        return out

    contexts: dict[int, object] = {}

    def context(index: int):
        if index not in contexts:
            contexts[index] = attention_context(model_map.layer(index))
        return contexts[index]

    merges = []
    for into, removed in sorted(receivers.items()):
        receiver = model_map.layer(into).attention
        contributing = [
            r for r in removed
            if (not adjacent or abs(r - into) == 1)
            and heads_per_group(r) == heads_per_group(into)
            and model_map.layer(r).attention.head_dim == receiver.head_dim
            and context(r) == context(into)
        ]
        if not contributing:
            continue
        pool = candidates(into, margin) + [c for r in contributing for c in candidates(r)]
        own = len(plan.layers[into].kv_groups)
        k = own if groups == "keep" else len(pool) if groups == "sum" else min(groups, len(pool))
        best = sorted(pool, key=lambda c: (-c[0], c[1], c[2]))[:k]
        chosen = sorted((layer, group) for _, layer, group in best)
        for r in contributing:
            merges.append(ClapMerge(removed=r, into=into, groups=chosen))
    return merges


# ------------------------------------------------------------------------------ internals


def _post_norms_kept(stats: CalibrationStats, targets: Targets) -> list[str]:
    """Post-norms left as real norms: those whose 1/rms varies too much over tokens for one constant."""
    limit = targets.absorb_max_spread
    if limit is None:
        return []
    if not targets.absorb_post_norms:
        raise PanguLightError("--absorb-max-spread chooses which post-norms to absorb; add --absorb-post-norms")
    if not (limit >= 0):
        raise PanguLightError(f"--absorb-max-spread must be a non-negative number (got {limit})")
    if stats.s_inv and not stats.s_inv_spread:
        raise PanguLightError(
            "--absorb-max-spread needs the spread of each post-norm's 1/rms, which these statistics predate; "
            "re-run `pangu-light calibrate`"
        )
    return sorted(name for name, spread in stats.s_inv_spread.items() if spread > limit)


def _check_stats(model_map: ModelMap, stats: CalibrationStats) -> None:
    if stats.channel.shape != (model_map.hidden_size,) or len(stats.heads) != len(model_map.layers):
        raise PanguLightError(
            f"the statistics are for another graph (hidden {stats.channel.shape[0]}, {len(stats.heads)} layers; "
            f"this graph: hidden {model_map.hidden_size}, {len(model_map.layers)} layers); "
            "re-run `pangu-light calibrate` on this graph"
        )
    for layer in model_map.layers:
        if stats.heads[layer.index].shape != (layer.attention.num_heads,) or stats.ffn[layer.index].shape != (
            layer.ffn.intermediate_size,
        ):
            raise PanguLightError(
                f"the statistics do not match layer {layer.index} of this graph; re-run `pangu-light calibrate` on it"
            )


def _layers_to_drop(model_map: ModelMap, stats: CalibrationStats, targets: Targets) -> set[int]:
    n = len(model_map.layers)  # both given, or a negative count: Targets.check
    if targets.layers is not None:
        bad = [i for i in targets.layers if not 0 <= i < n]
        if bad:
            raise PanguLightError(f"layer {bad[0]} does not exist; the model has {n} layers (0..{n - 1})")
        chosen = set(targets.layers)
    elif targets.drop_layers:
        chosen = set(int(i) for i in np.argsort(stats.block_influence, kind="stable")[: targets.drop_layers])
    else:
        chosen = set()
    if len(chosen) >= n:
        raise PanguLightError(f"dropping {len(chosen)} of {n} layers leaves no layer; keep at least one")
    return chosen


def _ffn_choice(
    model_map: ModelMap, stats: CalibrationStats, shape: Shape, uniform: bool, align: int = 1
) -> dict[int, list[int]]:
    kept_layers = [l for l in model_map.layers if l.index not in shape.dropped]
    widths = {l.index: shape.ffn[l.index] for l in kept_layers}
    total = sum(widths.values())
    full = sum(l.ffn.intermediate_size for l in kept_layers)
    if uniform or total == full or len(set(widths.values())) > 1 or len(kept_layers) == 1:
        return {l.index: _top(stats.ffn[l.index], widths[l.index]) for l in kept_layers}
    # One ranking over all kept layers of scores normalised by their layer's mean.
    entries = []
    for layer in kept_layers:
        scores = stats.ffn[layer.index]
        normalised = scores / max(float(scores.mean()), 1e-30)
        entries += [(-float(s), layer.index, m) for m, s in enumerate(normalised)]
    entries.sort()
    chosen: dict[int, list[int]] = {l.index: [] for l in kept_layers}
    for _, index, m in entries[:total]:
        chosen[index].append(m)
    if align > 1:
        counts = _aligned_counts({i: len(keep) for i, keep in chosen.items()},
                                 {l.index: l.ffn.intermediate_size for l in kept_layers}, total, align)
        return {i: _top(stats.ffn[i], count) for i, count in counts.items()}
    for layer in kept_layers:  # every layer keeps at least one neuron
        if not chosen[layer.index]:
            chosen[layer.index] = _top(stats.ffn[layer.index], 1)
    return {index: sorted(keep) for index, keep in chosen.items()}


def _select_by_obs(model_map: ModelMap, plan: PrunePlan, grams, which) -> None:
    """Keep the plan's widths, choose who fills them by the refit-aware elimination (calib.obs)."""
    if grams is None:
        raise PanguLightError("--selection obs needs the refit's Gram matrices: run it in prune, with its default "
                              "--refit refit")
    for layer, layer_plan in zip(model_map.layers, plan.layers):
        attention = layer.attention
        rep = attention.num_heads // attention.num_kv_heads
        per_group = len(layer_plan.heads) // max(len(layer_plan.kv_groups), 1)
        if per_group < rep and which != "obs-ffn":
            layer_plan.heads = obs_query_heads(
                grams.gram["o"][layer.index], attention.o.matmul_weight(), attention.head_dim, rep,
                layer_plan.kv_groups, per_group,
            )
        if len(layer_plan.ffn) < layer.ffn.intermediate_size and which != "obs-heads":
            layer_plan.ffn = obs_ffn_neurons(grams.gram["down"][layer.index], layer.ffn.down.matmul_weight(),
                                             len(layer_plan.ffn))


def _aligned_counts(counts: dict[int, int], full: dict[int, int], total: int, align: int) -> dict[int, int]:
    """Per-layer neuron counts rounded to multiples of ``align`` (or the layer's full width) that
    still add up to ``total`` where the widths allow: each layer gets the whole blocks its share of
    the global ranking holds, then the blocks left go to the largest remainders (ties: the lower
    layer). Within a layer the global ranking orders neurons as the layer's own scores do, so the
    kept neurons are its top ``count``. Every layer keeps at least one block."""
    def blocks_in(index: int) -> int:  # the full width counts as one more block when it is not aligned
        return -(-full[index] // align)

    def width(index: int, blocks: int) -> int:
        return min(full[index], blocks * align)

    blocks = {i: min(blocks_in(i), max(1, c // align)) for i, c in counts.items()}
    kept = sum(width(i, b) for i, b in blocks.items())
    remainders = sorted(counts, key=lambda i: (-(counts[i] % align), i))
    while kept < total and any(blocks[i] < blocks_in(i) for i in remainders):
        for i in remainders:
            if kept < total and blocks[i] < blocks_in(i):
                kept += width(i, blocks[i] + 1) - width(i, blocks[i])
                blocks[i] += 1
    return {i: width(i, b) for i, b in blocks.items()}


def _slnp_scales(model_map: ModelMap, hidden: list[int]) -> dict[str, float]:
    if len(hidden) == model_map.hidden_size:
        return {}
    scales = {}
    for norm in model_map.hidden_norms():
        gamma = norm.effective_gamma().astype(np.float64)
        kept = np.linalg.norm(gamma[hidden])
        scales[norm.gamma.name] = float(np.linalg.norm(gamma) / kept) if kept > 0 else 1.0
    return scales


def _top(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, sorted by index (ties: the lower index wins)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return sorted(int(i) for i in order[:k])


def _compact(values: Sequence[int], dropped: set[int]) -> int | list[int]:
    kept = [v for i, v in enumerate(values) if i not in dropped]
    return kept[0] if len(set(kept)) == 1 else kept
