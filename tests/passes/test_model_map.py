"""The model map derived from an exported graph agrees with the Hugging Face model it came from.

For every family and both graph kinds: the widths and counts equal the config, every norm has
the role its module plays (found from graph position, so GLM4's oddly named norms land right),
every gamma / projection is the initializer named after its module, tied embeddings and fused
gate_up are recognised, and the KV cache tensors are paired with their layers.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap

KINDS = pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "decode"])

# role -> module path inside ``model.layers.{i}``, per family.
_LLAMA_NORMS = {"pre_attn": "input_layernorm", "pre_ffn": "post_attention_layernorm"}
_GEMMA_NORMS = {
    "pre_attn": "input_layernorm",
    "post_attn": "post_attention_layernorm",
    "pre_ffn": "pre_feedforward_layernorm",
    "post_ffn": "post_feedforward_layernorm",
}
EXPECTED_NORMS = {
    "llama": _LLAMA_NORMS,
    "qwen2": _LLAMA_NORMS,
    "mistral": _LLAMA_NORMS,
    "qwen3": _LLAMA_NORMS,
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
    # GLM4 names its pre-FFN norm post_attention_layernorm: roles must come from position.
    "glm4": {
        "pre_attn": "input_layernorm",
        "post_attn": "post_self_attn_layernorm",
        "pre_ffn": "post_attention_layernorm",
        "post_ffn": "post_mlp_layernorm",
    },
}
QK_NORM_FAMILIES = {"qwen3", "gemma3"}
ONE_PLUS_W_FAMILIES = {"gemma2", "gemma3"}
TIED = {"llama": True, "qwen3": True, "gemma2": True, "gemma3": True, "qwen2": False, "mistral": False, "glm4": False}


def _map(exported_graph, family, kv_cache):
    model, path = exported_graph(family, kv_cache=kv_cache)
    return model, ModelMap.from_model(ir.load(path))


@KINDS
def test_numbers_equal_config(exported_graph, family, kv_cache):
    model, model_map = _map(exported_graph, family, kv_cache)
    config = model.config
    assert model_map.family == family
    assert model_map.graph_kind == ("decode" if kv_cache else "no-cache")
    assert model_map.hidden_size == config.hidden_size
    assert model_map.vocab_size == config.vocab_size
    assert len(model_map.layers) == config.num_hidden_layers
    assert [layer.index for layer in model_map.layers] == list(range(config.num_hidden_layers))
    for layer in model_map.layers:
        attn, ffn = layer.attention, layer.ffn
        assert layer.module == f"model.layers.{layer.index}"
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        assert ffn.intermediate_size == config.intermediate_size
        assert attn.q.out_features == config.num_attention_heads * config.head_dim
        assert attn.k.out_features == attn.v.out_features == config.num_key_value_heads * config.head_dim
        assert attn.o.out_features == ffn.down.out_features == config.hidden_size
        prefix = f"model.layers.{layer.index}"
        for role, lin in (("q_proj", attn.q), ("k_proj", attn.k), ("v_proj", attn.v), ("o_proj", attn.o),
                          ("down_proj", ffn.down)):
            assert lin.weight.name == f"{prefix}.{'mlp' if role == 'down_proj' else 'self_attn'}.{role}.weight"
    # The layers form one residual chain ending in the final norm.
    assert model_map.final_norm.role == "final"
    assert model_map.final_norm.gamma.name == "model.norm.weight"
    assert model_map.final_norm.input is model_map.layers[-1].output


@KINDS
def test_norm_roles_and_gammas(exported_graph, family, kv_cache):
    model, model_map = _map(exported_graph, family, kv_cache)
    state = model.state_dict()
    expected = EXPECTED_NORMS[family]
    for layer in model_map.layers:
        prefix = f"model.layers.{layer.index}"
        assert list(layer.norms) == list(expected), f"layer {layer.index}: {list(layer.norms)}"
        norms = dict(layer.norms)
        attn = layer.attention
        if family in QK_NORM_FAMILIES:
            assert attn.q_norm is not None and attn.k_norm is not None
            norms["q_norm"], norms["k_norm"] = attn.q_norm, attn.k_norm
            assert (attn.q_norm.role, attn.k_norm.role) == ("q_norm", "k_norm")
            assert int(attn.q_norm.gamma.shape[0]) == int(attn.k_norm.gamma.shape[0]) == attn.head_dim
        else:
            assert attn.q_norm is None and attn.k_norm is None
        modules = {**{r: f"{prefix}.{m}" for r, m in expected.items()},
                   "q_norm": f"{prefix}.self_attn.q_norm", "k_norm": f"{prefix}.self_attn.k_norm"}
        for role, norm in norms.items():
            assert norm.role == role
            assert norm.module == modules[role], (role, norm.module)
            assert norm.gamma.name == f"{modules[role]}.weight"
            np.testing.assert_array_equal(norm.gamma.const_value.numpy(), state[norm.gamma.name].numpy())
            assert norm.one_plus_w == (family in ONE_PLUS_W_FAMILIES), (role, norm.module)
            assert norm.eps == pytest.approx(model.config.rms_norm_eps, rel=1e-6)
    # Norm gammas are never shared: passes rescale each one alone.
    gammas = [id(n.gamma) for n in model_map.all_norms()]
    assert len(gammas) == len(set(gammas))
    assert model_map.final_norm.one_plus_w == (family in ONE_PLUS_W_FAMILIES)


@KINDS
def test_tied_embeddings_and_fused_gate_up(exported_graph, family, kv_cache):
    model, model_map = _map(exported_graph, family, kv_cache)
    assert model.config.tie_word_embeddings == TIED[family]
    assert model_map.tied_embeddings == TIED[family]
    if TIED[family]:
        assert model_map.lm_head.weight is model_map.embedding
    else:
        assert model_map.lm_head.weight.name == "lm_head.weight"
        assert model_map.embedding.name == "model.embed_tokens.weight"
    for layer in model_map.layers:
        ffn = layer.ffn
        prefix = f"model.layers.{layer.index}.mlp"
        assert ffn.module == prefix
        if family == "glm4":
            assert ffn.fused_gate_up and ffn.gate is ffn.up
            assert ffn.gate.weight.name == f"{prefix}.gate_up_proj.weight"
            assert ffn.gate.out_features == 2 * model.config.intermediate_size
        else:
            assert not ffn.fused_gate_up
            assert ffn.gate.weight.name == f"{prefix}.gate_proj.weight"
            assert ffn.up.weight.name == f"{prefix}.up_proj.weight"


@KINDS
def test_kv_cache_pairs_only_in_decode_graphs(exported_graph, family, kv_cache):
    _, model_map = _map(exported_graph, family, kv_cache)
    for layer in model_map.layers:
        attn, i = layer.attention, layer.index
        pairs = (attn.past_key, attn.past_value, attn.present_key, attn.present_value)
        if kv_cache:
            assert [v.name for v in pairs] == [
                f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value"
            ]
        else:
            assert pairs == (None, None, None, None)


@KINDS
def test_json_round_trip(exported_graph, family, kv_cache):
    model, model_map = _map(exported_graph, family, kv_cache)
    data = json.loads(model_map.dumps())
    assert data == model_map.to_json()
    assert data["num_layers"] == model.config.num_hidden_layers
    assert data["layers"][0]["attention"]["num_kv_heads"] == model.config.num_key_value_heads
    assert (data["layers"][0]["attention"]["kv_cache"] is not None) == kv_cache
    summary = model_map.summary()
    assert f"family {family}" in summary and f"{model.config.num_hidden_layers} layers" in summary


# ----------------------------------------------------------------------------- not an LLM
def _matmul_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    w = ir.Value(name="W", const_value=ir.tensor(np.ones((4, 3), dtype=np.float32), name="W"))
    node = ir.Node("", "MatMul", [x, w], outputs=[ir.Value(name="y")])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18}, name="toy")
    return ir.Model(graph, ir_version=10)


def test_not_an_llm_graph_is_refused():
    with pytest.raises(PanguLightError, match="not a decoder-only LLM graph"):
        ModelMap.from_model(_matmul_model())


def test_llm_graph_without_its_layers_is_refused(exported_graph):
    """input_ids and logits alone do not make an LLM: rewire the logits to skip the layers."""
    _, path = exported_graph("llama", kv_cache=False)
    model = ir.load(path)
    model_map = ModelMap.from_model(model)
    # Let the final norm read the embedding output: the decoder layers are no longer used.
    final_norm = model_map.final_norm
    embedded = model_map.embedding_gather.outputs[0]
    for node in final_norm.nodes:
        for index, value in enumerate(node.inputs):
            if value is final_norm.input:
                node.replace_input_with(index, embedded)
    with pytest.raises(PanguLightError, match="not a decoder-only LLM graph.*final norm does not read"):
        ModelMap.from_model(model)
