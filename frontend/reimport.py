"""Re-import a pruned graph as a trainable PyTorch model with per-layer shapes (``reimport``).

No generic ONNX-to-torch conversion: the graph's weights keep their ``state_dict`` names and the
exporter recorded the original Hugging Face config (``core.contract.SOURCE_CONFIG``), so the model
is the standard Hugging Face class of that architecture with its modules resized to the graph's
shapes (``frontend.student``, which also saves and loads it)::

    config      source config with hidden H', n layers (sliding/full types of the layers kept),
                and the shapes of layer 0 (an HF config holds one shape for all layers)
    layer i     head counts h_i, KV groups g_i and FFN width I_i read from the model map
    post-norms  removed by absorb-post-norm or drop-post-norm become the identity: absorb folded
                the fixed scale gamma_abs = s_inv * gamma_eff (paper eqs. 8-10) into the o_proj /
                down_proj rows, which is where the re-imported weights carry it
    Gemma       the embedding scale stays the graph's constant sqrt(original hidden), not sqrt(H')

Weights are loaded by name (a tied embedding is the one tensor the embedding Gather and the
lm_head MatMul share, whatever it is called), every parameter must be found with its exact shape,
and every graph weight must be used. Layer numbering follows the graph (drop-layers renumbers);
the original index of each kept layer (which picks its sliding/full attention type) is read from
``core.contract.LAYER_ORIGINS``, which drop-layers writes. Graphs compiled before that key existed
fall back to replaying the ``removed`` lists of the drop-layers records in
``core.contract.PASS_STATS``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import transformers

from pangu_light.core import contract
from pangu_light.core.contract import HEADS_DIVIDE_HIDDEN
from pangu_light.core.errors import PanguLightError
from pangu_light.core.records import layer_origins, pass_records
from pangu_light.frontend.export import check_supported
from pangu_light.frontend.student import (
    EMBED_SCALE,
    LayerShape,
    StudentSpec,
    build_student,
    load_tensors,
)
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["Reimported", "graph_tensors", "reimport", "spec_from_graph"]

# Post-norm role -> module name inside a decoder layer, for the sandwich-norm families.
POST_NORM_MODULES = {
    "gemma2": {"post_attn": "post_attention_layernorm", "post_ffn": "post_feedforward_layernorm"},
    "gemma3": {"post_attn": "post_attention_layernorm", "post_ffn": "post_feedforward_layernorm"},
    "glm4": {"post_attn": "post_self_attn_layernorm", "post_ffn": "post_mlp_layernorm"},
}


@dataclasses.dataclass
class Reimported:
    model: transformers.PreTrainedModel
    spec: StudentSpec
    graph_kind: str
    metadata: dict[str, str]


# ----------------------------------------------------------------------------- from a graph


def origin_layers(metadata: Mapping[str, str], original_count: int, count: int) -> list[int]:
    """Original index of each of the graph's ``count`` layers: ``core.contract.LAYER_ORIGINS`` when
    the graph has it; otherwise (graphs compiled before drop-layers wrote that key) replayed from the
    ``removed`` lists of its drop-layers records."""
    origin = layer_origins(metadata)
    where = f"its {contract.LAYER_ORIGINS} lists"
    if origin is None:
        origin = list(range(original_count))
        for record in pass_records(metadata):
            if record.get("pass") != "drop-layers" or not record.get("modified"):
                continue
            removed = set((record.get("stats") or {}).get("removed") or [])
            origin = [o for i, o in enumerate(origin) if i not in removed]
        where = "its drop-layers records leave"
    if len(origin) != count:
        raise PanguLightError(
            f"the graph has {count} layers, but its source config has {original_count} and {where} "
            f"{len(origin)}; re-import graphs made by `pangu-light compile`"
        )
    return origin


def spec_from_graph(model: ir.Model, model_map: ModelMap | None = None) -> StudentSpec:
    """The student's shapes: per-layer head counts and FFN widths from the model map."""
    model_map = model_map or ModelMap.from_model(model)
    meta = dict(model.metadata_props)
    raw = meta.get(contract.SOURCE_CONFIG)
    if not raw:
        raise PanguLightError(
            f"the graph records no {contract.SOURCE_CONFIG}; re-import needs a graph exported by "
            "`pangu-light export` (and then compiled)"
        )
    source = json.loads(raw)
    family = check_supported(transformers.AutoConfig.for_model(**copy.deepcopy(source)))
    layers_map = model_map.layers
    head_dims = {l.attention.head_dim for l in layers_map}
    if len(head_dims) != 1:
        raise PanguLightError(
            f"layers have different head sizes {sorted(head_dims)}; pangu-light never prunes head_dim"
        )
    head_dim = head_dims.pop()
    posts = POST_NORM_MODULES.get(family, {})
    shapes = []
    for layer in layers_map:
        missing = tuple(f"model.layers.{layer.index}.{leaf}" for role, leaf in posts.items() if role not in layer.norms)
        shapes.append(LayerShape(
            layer.attention.num_heads, layer.attention.num_kv_heads, layer.ffn.intermediate_size, missing,
        ))
    origin = origin_layers(meta, int(source["num_hidden_layers"]), len(layers_map))
    config = dict(source)
    # The modules get their per-layer head counts after construction; the config only has to be
    # one transformers accepts (see StudentSpec.standard_config), so where layer 0's query heads do
    # not divide the hidden size it names gcd(hidden, heads) of them.
    heads = shapes[0].num_heads
    if family in HEADS_DIVIDE_HIDDEN and model_map.hidden_size % heads:
        heads = math.gcd(model_map.hidden_size, heads)
    config.update(
        hidden_size=model_map.hidden_size, num_hidden_layers=len(layers_map), head_dim=head_dim,
        num_attention_heads=heads, num_key_value_heads=shapes[0].num_kv_heads,
        intermediate_size=shapes[0].intermediate_size, vocab_size=model_map.vocab_size,
        tie_word_embeddings=model_map.tied_embeddings, use_cache=False,
    )
    types = source.get("layer_types")
    if isinstance(types, list) and len(types) == int(source["num_hidden_layers"]):
        config["layer_types"] = [types[o] for o in origin]
    scale = None
    if EMBED_SCALE in model.graph.initializers:
        scale = float(model.graph.initializers[EMBED_SCALE].const_value.numpy())
    elif family in ("gemma2", "gemma3"):
        scale = float(source["hidden_size"]) ** 0.5
    return StudentSpec(
        family=family, config=config, hidden_size=model_map.hidden_size, head_dim=head_dim,
        tied=model_map.tied_embeddings, layers=shapes, embed_scale=scale, origin=origin,
    )


def graph_tensors(model: ir.Model, model_map: ModelMap) -> dict[str, np.ndarray]:
    """The graph's weights under their ``state_dict`` names (embedding and lm_head by role)."""
    tensors = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None and (name.endswith((".weight", ".bias")) or name == EMBED_SCALE):
            tensors[name] = value.const_value.numpy()
    tensors.pop(model_map.embedding.name, None)
    tensors.pop(model_map.lm_head.weight.name, None)
    tensors["model.embed_tokens.weight"] = model_map.embedding.const_value.numpy()
    if not model_map.tied_embeddings:
        tensors["lm_head.weight"] = model_map.lm_head.weight.const_value.numpy()
    return tensors


def reimport(graph: str | os.PathLike | ir.Model, *, attn_implementation: str = "eager") -> Reimported:
    """A float32 PyTorch model computing what ``graph`` computes, in train-ready form."""
    model = graph if isinstance(graph, ir.Model) else _load_graph(graph)
    model_map = ModelMap.from_model(model)
    spec = spec_from_graph(model, model_map)
    student = build_student(spec, attn_implementation=attn_implementation)
    load_tensors(student, spec, graph_tensors(model, model_map), where="the graph")
    for module, layer in zip(student.model.layers, model_map.layers):
        attention = module.self_attn
        assert attention.q_proj.out_features == layer.attention.num_heads * spec.head_dim
    return Reimported(
        model=student.eval(), spec=spec, graph_kind=model_map.graph_kind, metadata=dict(model.metadata_props),
    )


def _load_graph(path: str | os.PathLike) -> ir.Model:
    path = Path(path)
    if not path.is_file():
        raise PanguLightError(f"{path}: no such file; pass the path of a pruned .onnx graph")
    try:
        return ir.load(str(path))
    except Exception as error:  # protobuf raises several unrelated types for a corrupt file
        raise PanguLightError(f"{path} is not a readable ONNX model ({type(error).__name__}: {error})") from None
