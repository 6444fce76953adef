"""The one parameter count: what a model of given widths made from a model map holds.

Counted per decoder layer (``layer_parameters``), for hidden size H, K KV groups of
d = head_dim with n_rep query heads each (Q = K * n_rep * d, KV = K * d) and FFN width I::

    norms        H per hidden-size norm (pre/post attention, pre/post FFN) + the q/k norm gammas
    attention    H*Q + H*KV*2 + Q*H  (q, k, v, o)  + the biases the graph has (Q, KV, KV, H)
    FFN          3*H*I  (gate, up or the fused gate_up, down)  + biases (I or 2I, I, H)

plus the embedding ``V*H``, the final norm ``H`` and an untied lm_head ``V*H`` (+ bias).
``GraphStats`` counts each layer with it at the graph's own widths; the planner counts the
model a plan would make (``count_parameters`` of a ``Shape``).
"""

from __future__ import annotations

import dataclasses

from pangu_light.passes.analysis.map_types import Layer
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["Shape", "shape_of", "layer_parameters", "count_parameters"]


@dataclasses.dataclass
class Shape:
    """Kept sizes: hidden, and per layer (the map's numbering) heads per group, groups, FFN."""

    hidden: int
    heads_per_group: list[int]
    kv_groups: list[int]
    ffn: list[int]
    dropped: set[int]


def shape_of(model_map: ModelMap) -> Shape:
    """The widths the graph has now."""
    return Shape(
        hidden=model_map.hidden_size,
        heads_per_group=[layer.attention.num_heads // layer.attention.num_kv_heads for layer in model_map.layers],
        kv_groups=[layer.attention.num_kv_heads for layer in model_map.layers],
        ffn=[layer.ffn.intermediate_size for layer in model_map.layers],
        dropped=set(),
    )


def layer_parameters(layer: Layer, hidden: int, kv_groups: int, heads_per_group: int, ffn: int) -> int:
    """Parameters of ``layer`` at these widths (its biases and q/k norms as the graph has them)."""
    a, f, h = layer.attention, layer.ffn, hidden
    total = h * len(layer.norms)
    total += sum(n.gamma.const_value.size for n in (a.q_norm, a.k_norm) if n is not None)
    q, kv = kv_groups * heads_per_group * a.head_dim, kv_groups * a.head_dim
    total += h * q + (q if a.q.bias is not None else 0)
    total += 2 * (h * kv) + (kv if a.k.bias is not None else 0) + (kv if a.v.bias is not None else 0)
    total += q * h + (h if a.o.bias is not None else 0)
    if f.fused_gate_up:
        total += 2 * ffn * h + (2 * ffn if f.gate.bias is not None else 0)
    else:
        total += 2 * ffn * h + (ffn if f.gate.bias is not None else 0) + (ffn if f.up.bias is not None else 0)
    total += ffn * h + (h if f.down.bias is not None else 0)
    return int(total)


def count_parameters(model_map: ModelMap, shape: Shape) -> int:
    """Parameters of the model ``shape`` makes of ``model_map`` (tied embeddings counted once)."""
    h = shape.hidden
    total = model_map.vocab_size * h + h  # embedding + final norm
    if not model_map.tied_embeddings:
        total += model_map.vocab_size * h + (model_map.vocab_size if model_map.lm_head.bias is not None else 0)
    for layer in model_map.layers:
        if layer.index in shape.dropped:
            continue
        i = layer.index
        total += layer_parameters(layer, h, shape.kv_groups[i], shape.heads_per_group[i], shape.ffn[i])
    return int(total)
