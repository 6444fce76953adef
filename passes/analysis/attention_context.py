"""What an attention reads besides its own input and weights, so layers of one type can be told
apart: the rotary cos/sin and attention mask it shares with other layers, and the constants
between its score MatMul and its Softmax (scaling, soft-capping)::

    q, k --MatMul--> [Mul/Div(scale), Tanh cap, Add(mask)] --> Softmax        cos, sin, mask: shared

Two layers whose contexts differ (Gemma2/3 sliding-window vs global layers) cannot exchange KV
groups (CLAP). Read from the nodes of the attention module's scope only.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from pangu_light.passes.analysis.graph_utils import common_prefix, in_scope, walk_back
from pangu_light.passes.analysis.model_map import Layer

__all__ = ["AttentionContext", "attention_context"]


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
    """The context of ``layer``'s attention, read from the nodes of its attention module."""
    attention = layer.attention
    prefix = common_prefix(attention.q.module, attention.o.module)
    graph = attention.q.matmul.graph
    nodes = [n for n in graph if in_scope(n, prefix)]
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
