"""GraphStats against the PyTorch models the graphs were exported from (every family)."""

from __future__ import annotations

import json
from collections import Counter

import onnx
import onnx_ir as ir
import pytest
import torch

from pangu_light.passes.analysis.graph_stats import DEFAULT_CONTEXT, GraphStats
from pangu_light.passes.analysis.graph_utils import replace_initializer
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline


def torch_linears(hf_model) -> list[torch.nn.Linear]:
    """The decoder layers' projections (everything Linear but the lm_head)."""
    return [m for m in hf_model.model.modules() if isinstance(m, torch.nn.Linear)]


def slice_ffn(model: ir.Model, layer_index: int, keep: int) -> None:
    """Keep the first ``keep`` FFN neurons of one layer (gate/up rows, down columns)."""
    ffn = ModelMap.from_model(model).layer(layer_index).ffn
    width = ffn.intermediate_size
    if ffn.fused_gate_up:
        w = ffn.gate.weight.const_value.numpy()
        replace_initializer(ffn.gate.weight, w[list(range(keep)) + list(range(width, width + keep))])
    else:
        for lin in (ffn.gate, ffn.up):
            replace_initializer(lin.weight, lin.weight.const_value.numpy()[:keep])
    replace_initializer(ffn.down.weight, ffn.down.weight.const_value.numpy()[:, :keep])


def test_parameters_equal_torch(family, exported_graph):
    hf_model, path = exported_graph(family)
    stats = GraphStats.from_model(ir.load(path))
    # parameters() yields a tied weight once, as the stats must count it.
    assert stats.total_parameters == sum(p.numel() for p in hf_model.parameters())
    assert stats.tied_embeddings == hf_model.config.tie_word_embeddings
    for i, layer in enumerate(stats.layers):
        assert layer.parameters == sum(p.numel() for p in hf_model.model.layers[i].parameters())
    assert stats.embedding_parameters == hf_model.model.embed_tokens.weight.numel()
    assert stats.lm_head_parameters == (0 if stats.tied_embeddings else hf_model.lm_head.weight.numel())
    # RoPE's inv_freq is a buffer, not a parameter: reported apart.
    assert stats.other_float_elements >= hf_model.config.head_dim // 2


def test_flops_per_token_match_torch_and_formula(family, exported_graph):
    hf_model, path = exported_graph(family)
    config = hf_model.config
    model = ir.load(path)
    for context in (DEFAULT_CONTEXT, 7):
        stats = GraphStats.from_model(model, context=context)
        assert stats.context == context
        assert stats.projection_flops == 2 * sum(m.in_features * m.out_features for m in torch_linears(hf_model))
        assert stats.lm_head_flops == 2 * config.hidden_size * config.vocab_size
        # Scores Q K^T and context P V: head_dim multiply-adds per head per attended position, each.
        attention = config.num_hidden_layers * 2 * (2 * config.num_attention_heads * config.head_dim * context)
        assert stats.attention_flops == attention
        assert stats.flops_per_token == stats.projection_flops + stats.lm_head_flops + attention


def test_per_layer_shapes(family, exported_graph):
    hf_model, path = exported_graph(family)
    config = hf_model.config
    stats = GraphStats.from_model(ir.load(path))
    assert (stats.hidden_size, stats.vocab_size, stats.num_layers) == (
        config.hidden_size, config.vocab_size, config.num_hidden_layers,
    )
    for layer in stats.layers:
        assert layer.shape() == {
            "hidden_size": config.hidden_size, "num_heads": config.num_attention_heads,
            "num_kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size,
        }


def test_op_counts_match_the_proto(exported_graph):
    _, path = exported_graph("llama")
    proto = onnx.load(str(path))
    stats = GraphStats.from_model(ir.load(path))
    assert stats.op_counts == Counter(node.op_type for node in proto.graph.node)
    assert stats.tagged_nodes == Counter() and stats.tagged_initializers == Counter()
    assert stats.pipeline is None and stats.pass_stats == []


def test_sliced_ffn_is_counted_per_layer(family, exported_graph):
    hf_model, path = exported_graph(family)
    before = GraphStats.from_model(ir.load(path))
    model = ir.load(path)
    slice_ffn(model, 2, 40)
    after = GraphStats.from_model(model)
    hidden, width = hf_model.config.hidden_size, hf_model.config.intermediate_size
    removed = 3 * hidden * (width - 40)  # gate and up rows, down columns
    assert after.total_parameters == before.total_parameters - removed
    assert after.projection_flops == before.projection_flops - 2 * removed
    assert after.layers[2].intermediate_size == 40
    assert [layer.intermediate_size for i, layer in enumerate(after.layers) if i != 2] == [width] * 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied embeddings
def test_bytes_per_token_decode(family, exported_graph):
    hf_model, path = exported_graph(family, kv_cache=True)
    config = hf_model.config
    stats = GraphStats.from_model(ir.load(path), context=64)
    params = sum(p.numel() for p in hf_model.parameters())
    table = config.vocab_size * config.hidden_size
    weights = 4 * (params if config.tie_word_embeddings else params - table + config.hidden_size)
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 64 * 4
    decode = stats.bytes_per_token_decode()
    assert (decode.context, decode.weight_bytes, decode.kv_cache_bytes) == (64, weights, kv)
    assert decode.total_bytes == weights + kv
    half = stats.bytes_per_token_decode(context=1000, kv_bytes_per_element=2)
    assert half.kv_cache_bytes == kv // 64 * 1000 // 2 and half.weight_bytes == weights


def test_provenance_after_drop_layers(exported_graph):
    hf_model, path = exported_graph("llama")
    model = ir.load(path)
    report = run_pipeline(model, "drop-layers{layers=[1]}")
    stats = GraphStats.from_model(model)
    assert stats.num_layers == 3
    assert stats.total_parameters == sum(p.numel() for p in hf_model.parameters()) - sum(
        p.numel() for p in hf_model.model.layers[1].parameters()
    )
    assert stats.pipeline == "drop-layers{layers=[1]}"
    assert stats.pass_stats == report.to_json()
    assert stats.pass_stats[0]["stats"]["removed"] == [1]
    # Layers 2 and 3 were renamed to 1 and 2: 9 weights each (7 projections, 2 norms).
    assert stats.tagged_initializers == Counter({"drop-layers": report.records[0].stats["initializers_renamed"]})
    assert stats.tagged_initializers["drop-layers"] == 18
    assert set(stats.tagged_nodes) == {"drop-layers"} and stats.tagged_nodes["drop-layers"] >= 1


def test_json_and_text(exported_graph):
    _, path = exported_graph("qwen2")
    stats = GraphStats.from_model(ir.load(path))
    data = json.loads(stats.dumps())
    assert data["parameters"]["total"] == stats.total_parameters
    assert data["flops_per_token"]["total"] == stats.flops_per_token
    assert [layer["intermediate_size"] for layer in data["layers"]] == [96] * 4
    assert sum(data["op_counts"].values()) == sum(stats.op_counts.values())
    text = str(stats)
    assert f"parameters       {stats.total_parameters:,}" in text
    assert "layer heads  kv   hd    ffn" in text


def test_context_must_be_positive(exported_graph):
    _, path = exported_graph("llama")
    with pytest.raises(ValueError, match="context must be a positive"):
        GraphStats.from_model(ir.load(path), context=0)
