"""The model map: what every part of an exported decoder graph *is*, derived from the graph.

Passes never match tensor names typed by hand. They ask the map, which is rebuilt from the
graph itself on every call: graph position (what feeds what) plus the module paths that the
torch exporter records on each node (``core.contract.TORCH_NAME_SCOPES``). The module
paths only group nodes into layers and bound every search to its layer; *roles* come from
position, so GLM4's ``post_attention_layernorm`` (which is its pre-FFN norm) is found as
pre-FFN. The parts are in ``map_types``, the regions they are matched by in ``patterns``,
and the derivation in ``map_builder``.

One layer as the map sees it (sandwich norms dashed; Llama-style models have only the
pre-norms)::

    input --+--> [pre_attn] -> q,k,v -> ([q_norm],[k_norm], rope) -> attn -> o -> [post_attn] --Add--> h
            `---------------------------------------------------------------------------------^
    h ------+--> [pre_ffn] -> gate,up -> act(gate)*up -> down -> [post_ffn] --Add--> output
            `-------------------------------------------------------------------^

Head counts: GQA's ``Expand(Unsqueeze(kv), Concat[b, n_kv, n_rep, t, d])`` and the
``Reshape(Concat[b, n_heads, t, d])`` after it hold the only copies (q/k/v reshapes use -1).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import constant_array
from pangu_light.passes.analysis.map_builder import build_parts
from pangu_light.passes.analysis.map_types import (
    NORM_ROLES,
    Attention,
    FeedForward,
    HeadCountConstant,
    Layer,
    Linear,
    Norm,
)

__all__ = [
    "Norm",
    "Linear",
    "HeadCountConstant",
    "Attention",
    "FeedForward",
    "Layer",
    "ModelMap",
    "NORM_ROLES",
]


@dataclasses.dataclass
class ModelMap:
    family: str | None
    graph_kind: str
    hidden_size: int
    vocab_size: int
    embedding: ir.Value
    embedding_gather: ir.Node
    lm_head: Linear
    tied_embeddings: bool
    final_norm: Norm
    layers: list[Layer]

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: ir.Model) -> ModelMap:
        return cls(**build_parts(model))

    # ----------------------------------------------------------------- queries
    def all_norms(self) -> list[Norm]:
        norms = [n for layer in self.layers for n in layer.norms.values()]
        for layer in self.layers:
            norms.extend(n for n in (layer.attention.q_norm, layer.attention.k_norm) if n)
        return norms + [self.final_norm]

    def hidden_norms(self) -> list[Norm]:
        """Norms over the hidden dimension (all but q/k norms, which act on head_dim)."""
        return [n for n in self.all_norms() if n.role not in ("q_norm", "k_norm")]

    def layer(self, index: int) -> Layer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise PanguLightError(
            f"layer {index} does not exist; this model has layers 0..{len(self.layers) - 1}"
        )

    # ----------------------------------------------------------------- reporting
    def to_json(self) -> dict[str, Any]:
        def norm(n: Norm | None):
            if n is None:
                return None
            return {
                "role": n.role, "module": n.module, "gamma": n.gamma.name,
                "parametrization": "1+w" if n.one_plus_w else "w", "eps": n.eps,
                "input": n.input.name, "output": n.output.name,
            }

        def linear(lin: Linear):
            return {
                "module": lin.module, "weight": lin.weight.name,
                "bias": lin.bias.name if lin.bias is not None else None,
                "shape": [lin.out_features, lin.in_features],
            }

        layers = []
        for layer in self.layers:
            attn, ffn = layer.attention, layer.ffn
            layers.append({
                "index": layer.index, "module": layer.module,
                "input": layer.input.name, "output": layer.output.name,
                "norms": {role: norm(n) for role, n in layer.norms.items()},
                "attention": {
                    "q": linear(attn.q), "k": linear(attn.k), "v": linear(attn.v), "o": linear(attn.o),
                    "num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads,
                    "head_dim": attn.head_dim,
                    "q_norm": norm(attn.q_norm), "k_norm": norm(attn.k_norm),
                    "head_count_constants": [
                        {"node": c.concat.name, "input": c.index, "value_name": c.value.name,
                         "holds": c.what, "value": int(constant_array(c.value).reshape(-1)[0])}
                        for c in attn.head_count_constants
                    ],
                    "context": attn.context.name,
                    "kv_cache": None if attn.past_key is None else {
                        "past_key": attn.past_key.name, "past_value": attn.past_value.name,
                        "present_key": attn.present_key.name, "present_value": attn.present_value.name,
                    },
                },
                "ffn": {
                    "gate": linear(ffn.gate), "up": linear(ffn.up), "down": linear(ffn.down),
                    "fused_gate_up": ffn.fused_gate_up, "intermediate_size": ffn.intermediate_size,
                },
            })
        return {
            "family": self.family, "graph_kind": self.graph_kind,
            "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
            "num_layers": len(self.layers),
            "embedding": self.embedding.name, "lm_head": linear(self.lm_head),
            "tied_embeddings": self.tied_embeddings, "final_norm": norm(self.final_norm),
            "layers": layers,
        }

    def summary(self) -> str:
        lines = [
            f"family {self.family or '?'}, {self.graph_kind} graph, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}, {len(self.layers)} layers, "
            f"embeddings {'tied' if self.tied_embeddings else 'untied'}",
            f"{'layer':>5} {'heads':>5} {'kv':>3} {'hd':>4} {'ffn':>6}  norms",
        ]
        for layer in self.layers:
            attn = layer.attention
            norms = [f"{r}({'1+w' if n.one_plus_w else 'w'})" for r, n in layer.norms.items()]
            norms += [f"{n.role}" for n in (attn.q_norm, attn.k_norm) if n]
            lines.append(
                f"{layer.index:>5} {attn.num_heads:>5} {attn.num_kv_heads:>3} {attn.head_dim:>4} "
                f"{layer.ffn.intermediate_size:>6}  {' '.join(norms)}"
            )
        return "\n".join(lines)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)
