"""CLAP, Cross-Layer Attention Pruning (paper 3.2.1): the attention half of layer removal.

When layer l+1 is removed, the KV groups of layer l and of layer l+1 are ranked together by
the mean importance of their surviving query heads, and the top K become layer l's attention::

    S_group(l, g) = mean_{h in g, h kept} S_head(l, h)                                 (eq. 5)
    groups(l)     = top-K of { (l, g) } u { (l+1, g) } by S_group

Several removed layers in a row merge into the nearest kept layer before them (a removed
first layer: into the next kept layer). The planner chooses (``PrunePlan.clap_merges``, in
the original numbering); ``drop-layers`` carries the choice out with ``merge_attention``
below, before it re-wires the residual stream around the removed layers.

A KV group is self-contained: K/V head g reads rows g*d..g*d+d-1 of k_proj/v_proj, its query
heads read their q_proj rows, and each head adds ``ctx_h W_o[:, h]`` to the output. So the
merged attention of the receiver r is assembled from whole groups, each copied (no
arithmetic) from the layer it comes from::

    x_r --pre_attn_r--> q_proj[ rows of the chosen groups' heads, from their own layers ]
                        k_proj, v_proj[ rows of the chosen groups, from their own layers ]
                        [q_norm, k_norm: per head, each head's own layer's gamma]
                        rope_r, mask_r --> attn --> o_proj[:, columns of those heads] (+ b_o of r)

The KV group count (shape constants, past/present dim 1) becomes K; heads per group stay.
What the transplanted groups share with the receiver, and how that is kept consistent:

- Input: they read the receiver's normalised input (its pre-attention norm), as in the paper.
  (Rescaling their Q/K/V input columns by gamma_removed / gamma_kept was measured worse on
  SmolLM2, see DESIGN.md.)
- q/k norms (Qwen3, Gemma3): an RMSNorm over head_dim with one gamma[d] per layer. Each head
  keeps its own layer's gamma: the merged layer's gamma becomes per head, ``[heads, d]`` when
  the norm acts on ``[b, s, heads, d]`` (Qwen3) or ``[heads, 1, d]`` on ``[b, heads, s, d]``
  (Gemma3), read off the graph (a Transpose between projection and norm, or none). Exact:
  the RMS is per head either way. When every kept head has the same gamma it stays ``[d]``.
- Rotary embedding, attention mask (sliding window), score scaling and soft-capping: the
  receiver's. Groups may only come from layers whose attention reads the same rotary cos/sin,
  the same mask and the same score constants (``attention_context``); a merge across layer
  types (Gemma2/3 sliding vs global layers: other window, Gemma3 also another rope base) is
  refused. The planner only proposes groups from layers of the receiver's type.
- Heads per group and head_dim must agree, so GQA stays regular.
- Post-attention norm (sandwich models): the merged heads' sum goes through the receiver's
  post-norm, as in the paper. If ``absorb-post-norm`` already folded the post-norms into
  o_proj, each transplanted o_proj column carries its own layer's absorbed scale
  s_inv * gamma: the group adds to the residual what it added in its own layer.

Merging runs after the plan's width passes: every layer involved must already have the plan's
kept groups and heads (drop-layers runs last in ``PrunePlan.pipeline``), and a group named by
the plan must be one its layer keeps. A receiver whose chosen groups are its own, in order, is
not touched (CLAP then is plain removal, byte for byte).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import module_scopes, replace_initializer, walk_back
from pangu_light.passes.analysis.model_map import Attention, Layer, Linear, ModelMap, Norm
from pangu_light.passes.infra.base import PanguPass
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.head_surgery import (
    all_head_count_constants,
    clear_intermediate_shapes,
    head_rows,
    set_head_count,
    set_kv_heads_in_io,
)

__all__ = ["AttentionContext", "GroupSource", "attention_context", "merge_attention", "resolve_merges"]


# ------------------------------------------------------------------------------ layer types


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What an attention reads besides its own input and weights: values computed once for
    the model (rotary cos/sin, the attention mask, sequence sizes), by identity, and the
    constants between the score MatMul and the Softmax (scaling, soft-capping). Layers of
    one type share it; a sliding-window layer and a global one differ in the mask (and in
    Gemma3 in cos/sin)."""

    shared: frozenset[ir.Value]
    score_constants: tuple[tuple[str, tuple[int, ...], bytes], ...]

    def differences(self, other: AttentionContext) -> str:
        names = sorted(v.name or "?" for v in self.shared ^ other.shared)
        parts = []
        if names:
            parts.append(f"they read different rotary/mask values ({', '.join(names)})")
        if self.score_constants != other.score_constants:
            parts.append("their score scaling or soft-capping constants differ")
        return " and ".join(parts)


def attention_context(layer: Layer) -> AttentionContext:
    attention = layer.attention
    prefix = _attention_module(attention)
    graph = attention.q.matmul.graph
    nodes = [n for n in graph if any(s == prefix or s.startswith(prefix + ".") for s in module_scopes(n))]
    inside = {v for n in nodes for v in n.outputs}
    own_cache = {v for v in (attention.past_key, attention.past_value) if v is not None}
    stop = inside | {layer.input}
    shared = set()
    for node in nodes:
        for value in node.inputs:
            if value is None or value in inside or value in own_cache or value.const_value is not None:
                continue
            # Computed from this layer's own input (its normalised input, shapes of its tensors)?
            if any(v in stop for v in walk_back([value], stop=stop)):
                continue
            shared.add(value)
    constants = []
    softmax = next((n for n in nodes if n.op_type == "Softmax"), None)
    current = softmax.inputs[0] if softmax is not None else None
    while current is not None and current in inside:
        node = current.producer()
        if node.op_type == "MatMul":
            break
        for value in node.inputs:
            if value is not None and value.const_value is not None:
                array = value.const_value.numpy()
                constants.append((node.op_type, tuple(array.shape), array.tobytes()))
        current = next((v for v in node.inputs if v is not None and v in inside), None)
    return AttentionContext(frozenset(shared), tuple(constants))


def _attention_module(attention: Attention) -> str:
    parts = []
    for a, b in zip(attention.q.module.split("."), attention.o.module.split(".")):
        if a != b:
            break
        parts.append(a)
    return ".".join(parts)


# ------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class GroupSource:
    """One KV group of a merged attention: ``position`` in ``layer``'s current numbering,
    ``original`` = (layer, group) in the plan's (original) numbering, for messages."""

    layer: Layer
    position: int
    original: tuple[int, int]


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


# ------------------------------------------------------------------------------ the surgery


def merge_attention(pass_: PanguPass, model: ir.Model, receiver: Layer, sources: list[GroupSource]) -> None:
    """Make ``receiver``'s attention the groups ``sources`` (see the module docstring)."""
    attention = receiver.attention
    _check_compatible(pass_.name, receiver, sources)
    rep = attention.num_heads // attention.num_kv_heads
    d = attention.head_dim

    def heads_of(source: GroupSource) -> list[int]:
        return [source.position * rep + r for r in range(rep)]

    def rows(linear_of, heads_for) -> tuple[np.ndarray, np.ndarray | None]:
        weights, biases = [], []
        for source in sources:
            linear = linear_of(source.layer.attention)
            index = head_rows(heads_for(source), d)
            weights.append(linear.weight.const_value.numpy()[index])
            if linear.bias is not None:
                biases.append(linear.bias.const_value.numpy()[index])
        return np.concatenate(weights, 0), (np.concatenate(biases, 0) if biases else None)

    q = rows(lambda a: a.q, heads_of)
    k = rows(lambda a: a.k, lambda s: [s.position])
    v = rows(lambda a: a.v, lambda s: [s.position])
    o = np.concatenate(
        [s.layer.attention.o.weight.const_value.numpy()[:, head_rows(heads_of(s), d)] for s in sources], 1
    )
    q_gamma = _per_head_gammas(attention.q_norm, sources, heads_of, lambda a: a.q_norm)
    k_gamma = _per_head_gammas(attention.k_norm, sources, lambda s: [s.position], lambda a: a.k_norm)
    # Everything is read and checked; now write.
    constants = all_head_count_constants(attention)
    for linear, (weight, bias) in ((attention.q, q), (attention.k, k), (attention.v, v)):
        _write(pass_, linear.weight, weight)
        if bias is not None:
            _write(pass_, linear.bias, bias)
    _write(pass_, attention.o.weight, o)
    for norm, projection, gamma in ((attention.q_norm, attention.q, q_gamma), (attention.k_norm, attention.k, k_gamma)):
        if norm is not None:
            _write(pass_, norm.gamma, _gamma_layout(pass_.name, receiver, norm, projection, gamma))
    groups = len(sources)
    if groups != attention.num_kv_heads:
        for constant in constants:
            if constant.what == "kv_heads":
                set_head_count(pass_, model, constant, groups)
            elif constant.what == "heads":
                set_head_count(pass_, model, constant, groups * rep)
        set_kv_heads_in_io(pass_, attention, groups)
    clear_intermediate_shapes(model)
    pass_.count("clap_receivers")
    pass_.count("kv_groups_merged", sum(s.layer is not receiver for s in sources))


def _check_compatible(pass_name: str, receiver: Layer, sources: list[GroupSource]) -> None:
    attention = receiver.attention
    rep = attention.num_heads // attention.num_kv_heads
    context = attention_context(receiver)
    checked = {receiver.index}
    for source in sources:
        layer = source.layer
        if layer.index in checked:
            continue
        checked.add(layer.index)
        other = layer.attention
        where = f"pass {pass_name}: CLAP cannot merge KV group {source.original[1]} of layer {layer.index} into layer {receiver.index}"
        if other.head_dim != attention.head_dim:
            raise PanguLightError(f"{where}: head_dim {other.head_dim} != {attention.head_dim}")
        if other.num_heads // other.num_kv_heads != rep:
            raise PanguLightError(
                f"{where}: it keeps {other.num_heads // other.num_kv_heads} query heads per group and layer "
                f"{receiver.index} keeps {rep}; GQA needs the same number in every group (re-plan with the same "
                "heads per group in both layers)"
            )
        for role, mine, theirs in (("q_norm", attention.q_norm, other.q_norm), ("k_norm", attention.k_norm, other.k_norm)):
            if (mine is None) != (theirs is None) or (mine is not None and mine.eps != theirs.eps):
                raise PanguLightError(f"{where}: their {role}s differ (one has none, or other eps)")
        for role, mine, theirs in (("q", attention.q, other.q), ("k", attention.k, other.k), ("v", attention.v, other.v)):
            if (mine.bias is None) != (theirs.bias is None):
                raise PanguLightError(f"{where}: one {role}_proj has a bias and the other not")
        difference = context.differences(attention_context(layer))
        if difference:
            raise PanguLightError(
                f"{where}: the layers are of different attention types ({difference}): a group would change "
                "its rotary embedding or attention window (Gemma's sliding vs global layers). Merge only "
                "layers of the same type; `pangu-light plan --clap` does"
            )


def _per_head_gammas(norm: Norm | None, sources, heads_of, norm_of) -> np.ndarray | None:
    """The gamma of every head of the merged layer, ``[heads, d]``, each from its own layer."""
    if norm is None:
        return None
    rows = []
    for source in sources:
        gamma = norm_of(source.layer.attention).gamma.const_value.numpy()
        d = gamma.shape[-1]
        per_head = gamma.reshape(-1, d)
        for head in heads_of(source):
            rows.append(per_head[0] if per_head.shape[0] == 1 else per_head[head])
    return np.stack(rows)


def _gamma_layout(pass_name: str, layer: Layer, norm: Norm, projection: Linear, gamma: np.ndarray) -> np.ndarray:
    """``[d]`` when every head has the same gamma; else per head, broadcasting against the
    tensor the norm reads: ``[heads, d]`` on ``[b, s, heads, d]``, ``[heads, 1, d]`` on
    ``[b, heads, s, d]`` (the view is transposed before the norm)."""
    if np.all(gamma == gamma[:1]):
        return gamma[0]
    ops, value = [], norm.input
    for _ in range(8):
        if value is projection.output:
            break
        node = value.producer()
        if node is None:
            value = None
            break
        ops.append(node)
        value = node.inputs[0]
    transposes = [n for n in ops if n.op_type == "Transpose"]
    if value is not projection.output or len(transposes) > 1 or [n.op_type for n in ops if n.op_type != "Transpose"] != ["Reshape"]:
        raise PanguLightError(
            f"pass {pass_name}: layer {layer.index}: the {norm.role} is not reached from its projection by a "
            "head view (Reshape, optionally Transpose); CLAP cannot give it per-head gammas"
        )
    if not transposes:
        return gamma
    perm = list(transposes[0].attributes.get_ints("perm", ()))
    if perm != [0, 2, 1, 3]:
        raise PanguLightError(
            f"pass {pass_name}: layer {layer.index}: the {norm.role} reads a view transposed by {perm}; "
            "CLAP knows [b, s, heads, d] and [b, heads, s, d]"
        )
    return gamma[:, None, :]


def _write(pass_: PanguPass, value: ir.Value, array: np.ndarray) -> None:
    readers = value.uses()
    if len(readers) != 1:
        raise PanguLightError(
            f"pass {pass_.name}: {value.name} is read by {len(readers)} nodes; CLAP rewrites it for one layer only "
            "(untie the weight first)"
        )
    replace_initializer(value, array)
    pass_.tag(value)
    pass_.count("initializers_rewritten")
