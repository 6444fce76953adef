"""Reading one layer's attention for the model map: its projections, head counts and KV cache.

Every search stays inside the layer's module scope (the ``...layers.N`` nodes): the Softmax,
the score MatMul before it (back along first inputs) and the context MatMul after it; the
GQA region (``patterns.GQA_EXPAND``) back from each attention operand; the cache Concat of a
decode graph (``past_key_values.{i}.*`` in, ``present.{i}.*`` out) after a projection::

    q,k,v -> ... -> MatMul(q, k^T) -> [scale, mask, cap] -> Softmax -> MatMul(., v) -> o_proj
                          ^ Reshape(Expand(k, [b, n_kv, n_rep, t, d]), [b, heads, t, d])
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import onnx_ir as ir

from pangu_light.passes.analysis import patterns
from pangu_light.passes.analysis.graph_utils import constant_array, walk_back
from pangu_light.passes.analysis.map_types import Attention, HeadCountConstant, Linear, Norm, not_understood

__all__ = ["build_attention"]


Upstream = Callable[[ir.Value], set[ir.Value]]


def build_attention(
    where: str, scope: str, layer_nodes: list[ir.Node], upstream: Upstream,
    qkv: list[Linear], linears: list[Linear], norms: list[Norm],
) -> Attention:
    """The attention of the layer ``scope`` (its nodes ``layer_nodes``, in graph order), whose
    q/k/v are ``qkv``; ``upstream(value)`` is every value ``value`` depends on (memoised)."""
    inside = set(layer_nodes)
    softmax = next((n for n in layer_nodes if n.op_type == "Softmax"), None)
    if softmax is None:
        raise not_understood(f"{where}: no Softmax after the q/k/v projections")
    scores = _producer_back(softmax.inputs[0], "MatMul", inside)
    context = _consumer_ahead(softmax.outputs[0], "MatMul", inside)
    if scores is None or context is None:
        raise not_understood(f"{where}: attention MatMuls around the Softmax not found")
    qkv_outputs = {lin.output: lin for lin in qkv}

    def source(value: ir.Value) -> Linear:
        hits = [qkv_outputs[v] for v in walk_back([value]) if v in qkv_outputs]
        if len(hits) != 1:
            raise not_understood(f"{where}: cannot tell which projection feeds an attention MatMul")
        return hits[0]

    q, k, v = source(scores.inputs[0]), source(scores.inputs[1]), source(context.inputs[1])
    if len({id(q), id(k), id(v)}) != 3:
        raise not_understood(f"{where}: q, k and v projections are not distinct")
    after_context = [
        (lin, upstream(lin.input))
        for lin in linears
        if lin not in qkv and context.outputs[0] in upstream(lin.input)
    ]
    # o_proj is the first of them: no other linear after the attention feeds it.
    o_candidates = [
        lin for lin, upstream in after_context
        if not any(other.output in upstream for other, _ in after_context if other is not lin)
    ]
    if len(o_candidates) != 1:
        raise not_understood(f"{where}: no o_proj after the attention")
    o = o_candidates[0]

    # q/k norms sit between a projection and the scores MatMul (Qwen3, Gemma3).
    between_q = set(walk_back([scores.inputs[0]], stop={q.output}))
    between_k = set(walk_back([scores.inputs[1]], stop={k.output}))
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    for n in norms:
        if n.output in between_q:
            n.role, q_norm = "q_norm", n
        elif n.output in between_k:
            n.role, k_norm = "k_norm", n

    constants, num_kv_heads, num_heads = _head_counts(where, scores, context, inside)
    head_dim_from_k = k.out_features
    if num_kv_heads is None:  # no GQA expansion: as many KV heads as query heads
        head_dim = _view_head_dim(where, k)
        num_kv_heads = num_heads = k.out_features // head_dim
    head_dim = head_dim_from_k // num_kv_heads
    if q.out_features != num_heads * head_dim or o.in_features != num_heads * head_dim:
        raise not_understood(
            f"{where}: q_proj has {q.out_features} rows, expected {num_heads} heads x {head_dim}"
        )
    past_key, present_key = _cache_pair(upstream, k.output, layer_nodes)
    past_value, present_value = _cache_pair(upstream, v.output, layer_nodes)
    return Attention(
        module=scope, q=q, k=k, v=v, o=o, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, head_count_constants=constants, q_norm=q_norm, k_norm=k_norm,
        context=o.input, past_key=past_key, past_value=past_value,
        present_key=present_key, present_value=present_value,
    )


def _head_counts(where, scores: ir.Node, context: ir.Node, inside: set[ir.Node]):
    constants: list[HeadCountConstant] = []
    num_kv = num_heads = None
    for operand in (scores.inputs[1], context.inputs[1]):
        gqa = _gqa_back(operand, inside)
        if gqa is None:
            continue
        if gqa is False:
            raise not_understood(f"{where}: the GQA Expand/Reshape does not hold constant head counts")
        expand_shape, reshape_shape = gqa["expand_shape"], gqa["reshape_shape"]
        constants += [
            HeadCountConstant(expand_shape, 1, "kv_heads"), HeadCountConstant(expand_shape, 2, "heads_per_group")
        ]
        num_kv, n_rep = int(patterns.scalar(gqa["kv_heads"])), int(patterns.scalar(gqa["heads_per_group"]))
        constants.append(HeadCountConstant(reshape_shape, 1, "heads"))
        num_heads = int(patterns.scalar(gqa["heads"]))
        if num_heads != num_kv * n_rep:
            raise not_understood(f"{where}: head counts disagree ({num_kv} x {n_rep} != {num_heads})")
    return constants, num_kv, num_heads


def _gqa_back(value: ir.Value, inside: set[ir.Node]) -> patterns.Match | None | bool:
    """The GQA region that ``value`` comes from, back along first inputs inside the layer;
    None when there is none, False when an Expand on the way is not a GQA region."""
    while value is not None:
        node = value.producer()
        if node is None or node not in inside:
            return None
        found = patterns.match(patterns.GQA_EXPAND, value)
        if found is not None:
            return found
        if node.op_type == "Expand":
            return False
        value = node.inputs[0]
    return None


def _view_head_dim(where, k: Linear) -> int:
    reshapes = [n for n in k.output.consumers() if n.op_type == "Reshape"]
    shape = reshapes[0].inputs[1].producer() if len(reshapes) == 1 else None
    if shape is None or shape.op_type != "Concat":
        raise not_understood(f"{where}: k_proj output is not reshaped into heads")
    head_dim = constant_array(shape.inputs[-1])
    if head_dim is None:
        raise not_understood(f"{where}: head_dim is not a constant")
    return int(head_dim.reshape(-1)[0])


def _cache_pair(upstream: Upstream, projection_out: ir.Value, layer_nodes: list[ir.Node]):
    """(past input, present output) of the layer's cache Concat that appends this
    projection's keys or values, or (None, None) in a no-cache graph."""
    for node in layer_nodes:
        if node.op_type != "Concat" or len(node.inputs) < 2:
            continue
        past, present = node.inputs[0], node.outputs[0]
        if past is not None and past.is_graph_input() and present.is_graph_output():
            if projection_out in upstream(node.inputs[1]):
                return past, present
    return None, None


def _producer_back(value: ir.Value | None, op_type: str, inside: set[ir.Node]) -> ir.Node | None:
    """The nearest ``op_type`` node back along first inputs, without leaving ``inside``."""
    while value is not None:
        node = value.producer()
        if node is None or node not in inside:
            return None
        if node.op_type == op_type:
            return node
        value = node.inputs[0]
    return None


def _consumer_ahead(value: ir.Value, op_type: str, inside: set[ir.Node]) -> ir.Node | None:
    """The nearest ``op_type`` node reading ``value`` (breadth first) inside ``inside``."""
    seen: set[ir.Node] = set()
    queue = deque([value])
    while queue:
        for node in queue.popleft().consumers():
            if node in seen or node not in inside:
                continue
            if node.op_type == op_type:
                return node
            seen.add(node)
            queue.extend(node.outputs)
    return None
