"""CLAP, Cross-Layer Attention Pruning (paper 3.2.1): the attention half of layer removal.

When layer l+1 is removed, the KV groups of layer l and of layer l+1 are ranked together by
the mean importance of their surviving query heads, and the top K become layer l's attention::

    S_group(l, g) = mean_{h in g, h kept} S_head(l, h)                                 (eq. 5)
    groups(l)     = top-K of { (l, g) } u { (l+1, g) } by S_group

Several removed layers in a row merge into the nearest kept layer before them (a removed
first layer: into the next kept layer). The planner chooses (``PrunePlan.clap_merges``, in
the original numbering; ``clap_plan.resolve_merges`` reads them in the graph's numbering);
``drop-layers`` carries the choice out with ``merge_attention`` below, before it re-wires
the residual stream around the removed layers.

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
  SmolLM2.)
- q/k norms (Qwen3, Gemma3): an RMSNorm over head_dim with one gamma[d] per layer. Each head
  keeps its own layer's gamma: the merged layer's gamma becomes per head, ``[heads, d]`` when
  the norm acts on ``[b, s, heads, d]`` (Qwen3) or ``[heads, 1, d]`` on ``[b, heads, s, d]``
  (Gemma3), read off the graph (a Transpose between projection and norm, or none). Exact:
  the RMS is per head either way. When every kept head has the same gamma it stays ``[d]``.
- Rotary embedding, attention mask (sliding window), score scaling and soft-capping: the
  receiver's. Groups may only come from layers whose attention reads the same rotary cos/sin,
  the same mask and the same score constants (``analysis.attention_context``); a merge across layer
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
from pangu_light.passes.analysis.attention_context import attention_context
from pangu_light.passes.analysis.graph_utils import exclusive, in_scope, replace_initializer
from pangu_light.passes.analysis.model_map import Layer, Linear, Norm
from pangu_light.passes.infra.base import PanguPass
from pangu_light.passes.surgery.head_surgery import (
    all_head_count_constants,
    clear_intermediate_shapes,
    head_rows,
    set_head_count,
    set_kv_heads_in_io,
)

__all__ = ["GroupSource", "merge_attention"]


@dataclasses.dataclass(frozen=True)
class GroupSource:
    """One KV group of a merged attention: ``position`` in ``layer``'s current numbering,
    ``original`` = (layer, group) in the plan's (original) numbering, for messages."""

    layer: Layer
    position: int
    original: tuple[int, int]


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
        _write(pass_, linear.weight, weight, [linear.transpose])
        if bias is not None:
            _write(pass_, linear.bias, bias, [linear.bias_add])
    _write(pass_, attention.o.weight, o, [attention.o.transpose])
    for norm, projection, gamma in ((attention.q_norm, attention.q, q_gamma), (attention.k_norm, attention.k, k_gamma)):
        if norm is not None:
            _write(pass_, norm.gamma, _gamma_layout(pass_.name, receiver, norm, projection, gamma), norm.nodes)
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
        where = (
            f"pass {pass_name}: CLAP cannot merge KV group {source.original[1]} of layer {layer.index} "
            f"into layer {receiver.index}"
        )
        if other.head_dim != attention.head_dim:
            raise PanguLightError(f"{where}: head_dim {other.head_dim} != {attention.head_dim}")
        if other.num_heads // other.num_kv_heads != rep:
            raise PanguLightError(
                f"{where}: it keeps {other.num_heads // other.num_kv_heads} query heads per group and layer "
                f"{receiver.index} keeps {rep}; GQA needs the same number in every group (re-plan with the same "
                "heads per group in both layers)"
            )
        norm_pairs = (("q_norm", attention.q_norm, other.q_norm), ("k_norm", attention.k_norm, other.k_norm))
        for role, mine, theirs in norm_pairs:
            if (mine is None) != (theirs is None) or (mine is not None and mine.eps != theirs.eps):
                raise PanguLightError(f"{where}: their {role}s differ (one has none, or other eps)")
        projection_pairs = (("q", attention.q, other.q), ("k", attention.k, other.k), ("v", attention.v, other.v))
        for role, mine, theirs in projection_pairs:
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
    while value is not projection.output:  # back along first inputs, inside the layer
        node = value.producer()
        if node is None or not in_scope(node, layer.module):
            value = None
            break
        ops.append(node)
        value = node.inputs[0]
    transposes = [n for n in ops if n.op_type == "Transpose"]
    others = [n.op_type for n in ops if n.op_type != "Transpose"]
    if value is not projection.output or len(transposes) > 1 or others != ["Reshape"]:
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


def _write(pass_: PanguPass, value: ir.Value, array: np.ndarray, readers: list[ir.Node]) -> None:
    """Rewrite ``value``, which only ``readers`` (the part of the merged layer it belongs to) may read."""
    if not exclusive(value, readers):
        raise PanguLightError(
            f"pass {pass_.name}: {value.name} is read by {len(value.uses())} nodes; CLAP rewrites it for one "
            "layer only (untie the weight first)"
        )
    replace_initializer(value, array)
    pass_.tag(value)
    pass_.count("initializers_rewritten")
