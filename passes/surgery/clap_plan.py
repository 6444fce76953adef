"""The plan's CLAP merges (``PrunePlan.clap_merges``, original numbering) checked and read in
the graph's current numbering: for each receiving layer, the KV groups it will hold and the
layer each comes from (``clap_merge.GroupSource``). Merging runs after the plan's width
passes, so every layer involved must already keep exactly the plan's groups and heads.
"""

from __future__ import annotations

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import Layer, ModelMap
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.clap_merge import GroupSource

__all__ = ["resolve_merges"]


def resolve_merges(
    plan: PrunePlan, model_map: ModelMap, drop: set[int], pass_name: str
) -> dict[int, list[GroupSource]]:
    """The plan's CLAP merges in the graph's current numbering: {receiver: its new groups},
    only for receivers that change. Every inconsistency is a PanguLightError."""
    where = f"pass {pass_name}"
    count = len(model_map.layers)
    by_into: dict[int, list[tuple[int, int]]] = {}
    merging: dict[int, set[int]] = {}
    seen: set[int] = set()
    for merge in plan.clap_merges:
        if not 0 <= merge.into < count:
            raise PanguLightError(
                f"{where}: a CLAP merge goes into layer {merge.into}, which does not exist (layers 0..{count - 1})"
            )
        if merge.removed not in drop:
            raise PanguLightError(
                f"{where}: a CLAP merge removes layer {merge.removed}, but the plan's drop_layers "
                f"{sorted(drop)} keep it; merge only removed layers"
            )
        if merge.into in drop:
            raise PanguLightError(
                f"{where}: layer {merge.removed} merges into layer {merge.into}, which is removed too; "
                "merge into a kept layer"
            )
        if merge.removed in seen:
            raise PanguLightError(f"{where}: layer {merge.removed} has two CLAP merges; give one")
        seen.add(merge.removed)
        groups = [tuple(g) for g in merge.groups]
        if by_into.setdefault(merge.into, groups) != groups:
            raise PanguLightError(
                f"{where}: the CLAP merges into layer {merge.into} list different groups "
                f"({by_into[merge.into]} and {groups}); give every merge into a layer the same list"
            )
        merging.setdefault(merge.into, set()).add(merge.removed)

    result = {}
    for into, groups in sorted(by_into.items()):
        if not groups:
            raise PanguLightError(f"{where}: the CLAP merge into layer {into} keeps no KV group; keep at least one")
        if len(set(groups)) != len(groups):
            raise PanguLightError(f"{where}: the CLAP merge into layer {into} names a group twice ({groups})")
        sources = []
        for layer_index, group in groups:
            if layer_index != into and layer_index not in merging[into]:
                raise PanguLightError(
                    f"{where}: the CLAP merge into layer {into} takes group {group} of layer {layer_index}, "
                    f"which is neither layer {into} nor a removed layer merging into it "
                    f"({sorted(merging[into])})"
                )
            layer = model_map.layer(layer_index)
            sources.append(GroupSource(layer, _current_position(plan, layer, group, pass_name), (layer_index, group)))
        receiver = model_map.layer(into)
        _check_pruned(plan, receiver, pass_name)
        own = list(range(receiver.attention.num_kv_heads))
        if [s.layer.index for s in sources] == [into] * len(own) and [s.position for s in sources] == own:
            continue
        result[into] = sources
    return result


def _check_pruned(plan: PrunePlan, layer: Layer, pass_name: str) -> None:
    """The plan's width pruning of ``layer`` must be done: its kept groups renumbered 0.. in
    order, only its kept heads left."""
    layer_plan = plan.layers[layer.index]
    attention = layer.attention
    if attention.num_kv_heads != len(layer_plan.kv_groups) or attention.num_heads != len(layer_plan.heads):
        raise PanguLightError(
            f"pass {pass_name}: layer {layer.index} has {attention.num_kv_heads} KV groups and "
            f"{attention.num_heads} query heads, but the plan keeps {len(layer_plan.kv_groups)} and "
            f"{len(layer_plan.heads)}; CLAP merges pruned layers: run prune-kv-groups{{plan=true}} and "
            "prune-heads{plan=true} before drop-layers (the plan's pipeline does)"
        )


def _current_position(plan: PrunePlan, layer: Layer, group: int, pass_name: str) -> int:
    """Where original KV group ``group`` of ``layer`` sits now (after the plan's width pruning)."""
    _check_pruned(plan, layer, pass_name)
    kept = sorted(plan.layers[layer.index].kv_groups)
    if group not in kept:
        raise PanguLightError(
            f"pass {pass_name}: the plan merges KV group {group} of layer {layer.index}, but that layer keeps "
            f"only groups {kept}; a merged group must be one its layer keeps"
        )
    return kept.index(group)
