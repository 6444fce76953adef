"""The parts of a model map: what a norm, a projection, an attention, an FFN and a layer are.

Each part holds the onnx-ir values and nodes it was matched from (``passes.analysis.patterns``),
so a pass edits the graph through them. The whole map is ``model_map.ModelMap``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError

__all__ = [
    "Norm", "Linear", "HeadCountConstant", "Attention", "FeedForward", "Layer", "NORM_ROLES", "not_understood",
]

NORM_ROLES = ("pre_attn", "post_attn", "pre_ffn", "post_ffn", "q_norm", "k_norm", "final")


def not_understood(what: str) -> PanguLightError:
    """The error for a graph the map cannot read: ``what`` names the part not found."""
    return PanguLightError(
        f"not a decoder-only LLM graph that pangu-light understands: {what}; export it "
        "with `pangu-light export` (graphs from other exporters are not supported)"
    )


# eq=False: parts of the map are compared by identity (``x in layer_linears``), never by value.
@dataclasses.dataclass(eq=False)
class Norm:
    role: str
    module: str
    gamma: ir.Value  # the initializer w (effective gamma is 1 + w when one_plus_w)
    one_plus_w: bool
    input: ir.Value  # x, the value normalised
    output: ir.Value  # gamma * x / rms(x)
    eps: float
    nodes: list[ir.Node]

    def effective_gamma(self) -> np.ndarray:
        w = self.gamma.const_value.numpy().astype(np.float64)
        return 1.0 + w if self.one_plus_w else w


@dataclasses.dataclass(eq=False)
class Linear:
    module: str
    weight: ir.Value  # initializer [out, in]
    matmul: ir.Node
    transpose: ir.Node | None
    bias: ir.Value | None
    bias_add: ir.Node | None
    input: ir.Value
    output: ir.Value  # after the bias Add when there is one

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def matmul_weight(self) -> np.ndarray:
        """The weight in the MatMul layout ``y = x W``: [in, out], float64 (for refits and rankings)."""
        return self.weight.const_value.numpy().astype(np.float64).T


@dataclasses.dataclass
class HeadCountConstant:
    """One shape constant that encodes a head count: ``concat.inputs[index]`` holds ``what``."""

    concat: ir.Node
    index: int
    what: str  # "kv_heads" | "heads_per_group" | "heads"

    @property
    def value(self) -> ir.Value:
        return self.concat.inputs[self.index]


@dataclasses.dataclass
class Attention:
    module: str
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_count_constants: list[HeadCountConstant]
    q_norm: Norm | None
    k_norm: Norm | None
    context: ir.Value  # attention output before o_proj, [b, s, heads * head_dim]
    past_key: ir.Value | None
    past_value: ir.Value | None
    present_key: ir.Value | None
    present_value: ir.Value | None


@dataclasses.dataclass
class FeedForward:
    module: str
    gate: Linear  # for a fused gate_up projection, gate is up is the fused Linear
    up: Linear
    down: Linear
    fused_gate_up: bool
    intermediate_size: int


@dataclasses.dataclass
class Layer:
    index: int
    module: str
    input: ir.Value
    output: ir.Value
    norms: dict[str, Norm]
    attention: Attention
    ffn: FeedForward
    residual_adds: list[ir.Node]
