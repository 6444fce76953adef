"""Size and cost of an exported decoder graph: parameters, FLOPs per token, shapes, provenance.

Everything is derived from the model map (``ModelMap.from_model``), so it stays right after
pruning, when layers differ in heads and FFN width.

Parameters (``total_parameters``) are the elements of the initializers the map names as
weights, each distinct initializer counted once (each layer's by ``parameters.layer_parameters``,
the formula the planner uses too):

- the embedding table ``[vocab, hidden]``;
- every RMSNorm gamma (pre/post attention, pre/post FFN, q/k norms, the final norm);
- every projection weight (q, k, v, o, gate, up or the fused gate_up, down) and its bias
  when the graph adds one (Qwen2's q/k/v);
- the lm_head weight (and bias), *unless* it is the embedding itself (tied embeddings: the
  shared tensor is counted once).

Not counted: constant buffers that are not model parameters (RoPE ``inv_freq``), shape
constants and scalar constants (eps, 1 for Gemma's ``1 + w``), which are reported apart as
``other_float_elements``. For a freshly exported model, ``total_parameters`` equals
``sum(p.numel() for p in hf_model.parameters())``.

FLOPs per token (one FLOP = one multiply or one add; a multiply-add is 2 FLOPs), for one
token that attends over ``context`` positions (itself included; e.g. the decode step at
cache length ``context - 1``)::

    projections  = sum over every projection (q, k, v, o, gate/up, down) of 2 * in * out
    lm_head      = 2 * hidden * vocab
    attention    = sum over layers of 4 * num_heads * head_dim * context
                   (2 * num_heads * head_dim * context for the scores Q K^T, and the same
                   again for the context softmax(.) V)
    total        = projections + lm_head + attention

Biases, norms, RoPE, softmax, activations and residual adds are left out (they are
O(hidden) per token, not O(hidden^2)). Sliding-window layers are counted as if they attend
over the full ``context`` (the graph does not record the window), so the attention term
is an upper bound for Gemma's local layers when ``context`` exceeds the window.

Bytes per decoded token (``bytes_per_token_decode``): the weights one decode step reads,
``sum of parameter bytes`` less the embedding table plus the one row the lookup gathers
(the whole table when it is tied to the lm_head, which reads all of it), plus the KV cache
it reads, ``sum over layers of 2 * num_kv_heads * head_dim * context * kv_bytes``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.records import pass_records
from pangu_light.passes.analysis.model_map import Layer, Linear, ModelMap
from pangu_light.passes.analysis.parameters import layer_parameters

__all__ = [
    "DEFAULT_CONTEXT",
    "LayerStats",
    "DecodeBytes",
    "GraphStats",
]

DEFAULT_CONTEXT = 128


@dataclasses.dataclass
class LayerStats:
    """Shape and cost of one decoder layer."""

    index: int
    module: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    parameters: int
    projection_flops: int  # per token: 2 * in * out summed over the layer's projections
    attention_flops: int  # per token at the given context: 4 * num_heads * head_dim * context
    kv_elements_per_position: int  # 2 * num_kv_heads * head_dim

    @property
    def flops_per_token(self) -> int:
        return self.projection_flops + self.attention_flops

    def shape(self) -> dict[str, int]:
        return {
            "hidden_size": self.hidden_size, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "module": self.module, **self.shape(),
            "parameters": self.parameters, "projection_flops": self.projection_flops,
            "attention_flops": self.attention_flops, "flops_per_token": self.flops_per_token,
        }


@dataclasses.dataclass
class DecodeBytes:
    """Memory traffic of one decode step: weights read plus KV cache read."""

    context: int
    weight_bytes: int
    kv_cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    def to_json(self) -> dict[str, int]:
        return {
            "context": self.context, "weight_bytes": self.weight_bytes,
            "kv_cache_bytes": self.kv_cache_bytes, "total_bytes": self.total_bytes,
        }


@dataclasses.dataclass
class GraphStats:
    family: str | None
    graph_kind: str
    context: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    layers: list[LayerStats]
    embedding_parameters: int
    final_norm_parameters: int
    lm_head_parameters: int  # 0 when tied (the embedding already counts the tensor)
    lm_head_flops: int
    parameter_bytes: int
    embedding_bytes: int
    embedding_row_bytes: int
    kv_bytes_per_element: int
    other_float_elements: int
    op_counts: Counter
    tagged_nodes: Counter
    tagged_initializers: Counter
    pipeline: str | None
    pass_stats: list[dict[str, Any]]

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: ir.Model, context: int = DEFAULT_CONTEXT) -> GraphStats:
        """Stats of ``model``; ``context`` is the attention length used for FLOPs per token."""
        if context < 1:
            raise ValueError(f"context must be a positive number of positions, got {context}")
        model_map = ModelMap.from_model(model)
        graph = model.graph
        counted: set[int] = set()  # ids of initializers already counted (tied weights)

        def elements(*values: ir.Value | None) -> int:
            total = 0
            for value in values:
                if value is None or id(value) in counted:
                    continue
                counted.add(id(value))
                total += _numel(value)
            return total

        embedding = elements(model_map.embedding)
        layers = [_layer_stats(layer, context) for layer in model_map.layers]
        final_norm = elements(model_map.final_norm.gamma)
        lm_head = elements(model_map.lm_head.weight, model_map.lm_head.bias)

        weights = _weight_values(model_map)
        parameter_bytes = sum(_nbytes(v) for v in weights.values())
        weight_ids = set(weights)
        other = sum(
            _numel(v) for v in graph.initializers.values()
            if id(v) not in weight_ids and v.dtype is not None and v.dtype.is_floating_point()
        )

        op_counts: Counter = Counter(node.op_type for node in graph.all_nodes())
        tagged_nodes: Counter = Counter()
        for node in graph.all_nodes():
            tagged_nodes.update(_tags(node))
        tagged_initializers: Counter = Counter()
        for value in graph.initializers.values():
            tagged_initializers.update(_tags(value))

        emb = model_map.embedding
        emb_itemsize = _itemsize(emb)
        kv_itemsize = emb_itemsize
        past = model_map.layers[0].attention.past_key
        if past is not None and past.dtype is not None:
            kv_itemsize = int(past.dtype.itemsize)
        meta = model.metadata_props
        return cls(
            family=model_map.family,
            graph_kind=model_map.graph_kind,
            context=context,
            hidden_size=model_map.hidden_size,
            vocab_size=model_map.vocab_size,
            tied_embeddings=model_map.tied_embeddings,
            layers=layers,
            embedding_parameters=embedding,
            final_norm_parameters=final_norm,
            lm_head_parameters=lm_head,
            lm_head_flops=2 * model_map.lm_head.in_features * model_map.lm_head.out_features,
            parameter_bytes=parameter_bytes,
            embedding_bytes=_nbytes(emb),
            embedding_row_bytes=int(emb.shape[1]) * emb_itemsize,
            kv_bytes_per_element=kv_itemsize,
            other_float_elements=other,
            op_counts=op_counts,
            tagged_nodes=tagged_nodes,
            tagged_initializers=tagged_initializers,
            pipeline=meta.get(contract.PIPELINE),
            pass_stats=pass_records(meta),
        )

    # ----------------------------------------------------------------- totals
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def total_parameters(self) -> int:
        return (
            self.embedding_parameters + self.layer_parameters
            + self.final_norm_parameters + self.lm_head_parameters
        )

    @property
    def projection_flops(self) -> int:
        """Per token, the decoder layers' projections only (no lm_head, no attention)."""
        return sum(layer.projection_flops for layer in self.layers)

    @property
    def attention_flops(self) -> int:
        return sum(layer.attention_flops for layer in self.layers)

    @property
    def flops_per_token(self) -> int:
        return self.projection_flops + self.lm_head_flops + self.attention_flops

    def bytes_per_token_decode(
        self, context: int | None = None, kv_bytes_per_element: int | None = None
    ) -> DecodeBytes:
        """Bytes one decode step reads at cache length ``context`` (default: this stats' context).

        ``kv_bytes_per_element`` defaults to the dtype of the graph's KV-cache inputs (decode
        graphs) or of the weights (no-cache graphs).
        """
        context = self.context if context is None else context
        kv_bytes = self.kv_bytes_per_element if kv_bytes_per_element is None else kv_bytes_per_element
        weights = self.parameter_bytes
        if not self.tied_embeddings:  # the lookup reads one row; a tied lm_head reads it all
            weights += self.embedding_row_bytes - self.embedding_bytes
        kv = sum(layer.kv_elements_per_position for layer in self.layers) * context * kv_bytes
        return DecodeBytes(context=context, weight_bytes=weights, kv_cache_bytes=kv)

    # ----------------------------------------------------------------- reporting
    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "graph_kind": self.graph_kind,
            "context": self.context,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_layers": self.num_layers,
            "tied_embeddings": self.tied_embeddings,
            "parameters": {
                "total": self.total_parameters,
                "embedding": self.embedding_parameters,
                "layers": self.layer_parameters,
                "final_norm": self.final_norm_parameters,
                "lm_head": self.lm_head_parameters,
                "bytes": self.parameter_bytes,
                "other_float_elements": self.other_float_elements,
            },
            "flops_per_token": {
                "total": self.flops_per_token,
                "projections": self.projection_flops,
                "lm_head": self.lm_head_flops,
                "attention": self.attention_flops,
            },
            "bytes_per_token_decode": self.bytes_per_token_decode().to_json(),
            "layers": [layer.to_json() for layer in self.layers],
            "op_counts": dict(sorted(self.op_counts.items())),
            "tagged_nodes": dict(sorted(self.tagged_nodes.items())),
            "tagged_initializers": dict(sorted(self.tagged_initializers.items())),
            "pipeline": self.pipeline,
            "pass_stats": self.pass_stats,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def format(self) -> str:
        """A readable report: totals, the per-layer table, ops and provenance."""
        decode = self.bytes_per_token_decode()
        lines = [
            f"family {self.family or '?'}, {self.graph_kind} graph, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}, {self.num_layers} layers, "
            f"embeddings {'tied' if self.tied_embeddings else 'untied'}",
            f"parameters       {self.total_parameters:,} (embedding {self.embedding_parameters:,}, "
            f"layers {self.layer_parameters:,}, final norm {self.final_norm_parameters:,}, "
            f"lm_head {self.lm_head_parameters:,}{' tied' if self.tied_embeddings else ''})",
            f"FLOPs per token  {self.flops_per_token:,} at context {self.context} (projections "
            f"{self.projection_flops:,}, lm_head {self.lm_head_flops:,}, attention {self.attention_flops:,})",
            f"decode bytes/token {decode.total_bytes:,} (weights {decode.weight_bytes:,}, "
            f"KV cache {decode.kv_cache_bytes:,})",
            "",
            f"{'layer':>5} {'heads':>5} {'kv':>3} {'hd':>4} {'ffn':>6} {'params':>12} {'FLOPs/token':>13}",
        ]
        for layer in self.layers:
            lines.append(
                f"{layer.index:>5} {layer.num_heads:>5} {layer.num_kv_heads:>3} {layer.head_dim:>4} "
                f"{layer.intermediate_size:>6} {layer.parameters:>12,} {layer.flops_per_token:>13,}"
            )
        lines += ["", "ops: " + ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items()))]
        if self.pipeline:
            lines.append(f"pipeline: {self.pipeline}")
        for kind, counts in (("nodes", self.tagged_nodes), ("initializers", self.tagged_initializers)):
            if counts:
                lines.append(f"tagged {kind}: " + ", ".join(f"{p} {n}" for p, n in sorted(counts.items())))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------- helpers
def _layer_linears(layer: Layer) -> list[Linear]:
    attn, ffn = layer.attention, layer.ffn
    linears = [attn.q, attn.k, attn.v, attn.o, ffn.gate]
    if not ffn.fused_gate_up:
        linears.append(ffn.up)
    return linears + [ffn.down]


def _layer_norm_gammas(layer: Layer) -> list[ir.Value]:
    norms = list(layer.norms.values())
    norms += [n for n in (layer.attention.q_norm, layer.attention.k_norm) if n is not None]
    return [n.gamma for n in norms]


def _layer_stats(layer: Layer, context: int) -> LayerStats:
    attn = layer.attention
    linears = _layer_linears(layer)
    hidden, kv_groups = attn.q.in_features, attn.num_kv_heads
    parameters = layer_parameters(
        layer, hidden, kv_groups, attn.num_heads // kv_groups, layer.ffn.intermediate_size
    )
    return LayerStats(
        index=layer.index,
        module=layer.module,
        hidden_size=attn.q.in_features,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        intermediate_size=layer.ffn.intermediate_size,
        parameters=parameters,
        projection_flops=sum(2 * lin.in_features * lin.out_features for lin in linears),
        attention_flops=4 * attn.num_heads * attn.head_dim * context,
        kv_elements_per_position=2 * attn.num_kv_heads * attn.head_dim,
    )


def _weight_values(model_map: ModelMap) -> dict[int, ir.Value]:
    """Every initializer the map names as a parameter, by identity (tied ones once)."""
    values: list[ir.Value | None] = [model_map.embedding, model_map.final_norm.gamma]
    values += [model_map.lm_head.weight, model_map.lm_head.bias]
    for layer in model_map.layers:
        values += _layer_norm_gammas(layer)
        for lin in _layer_linears(layer):
            values += [lin.weight, lin.bias]
    return {id(v): v for v in values if v is not None}


def _numel(value: ir.Value) -> int:
    if value.const_value is not None:
        return int(value.const_value.size)
    return int(value.shape.numel()) if value.shape is not None else 0


def _itemsize(value: ir.Value) -> int:
    dtype = value.const_value.dtype if value.const_value is not None else value.dtype
    return int(dtype.itemsize) if dtype is not None else 0


def _nbytes(value: ir.Value) -> int:
    return _numel(value) * _itemsize(value)


def _tags(obj: ir.Node | ir.Value) -> list[str]:
    raw = obj.metadata_props.get(contract.PASS_TAG)
    return [name for name in raw.split(",") if name] if raw else []
