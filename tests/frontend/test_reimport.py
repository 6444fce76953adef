"""Re-import: the PyTorch model rebuilt from a pruned graph computes the graph's logits under ONNX
Runtime, for every family, with per-layer head counts, KV groups, FFN widths, dropped layers, a
sliced hidden size and absorbed or dropped post-norms; saved students load back (a uniform one
with plain ``from_pretrained``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.reimport import reimport
from pangu_light.frontend.student import STUDENT_FILE, build_student, load_student, save_student
from pangu_light.passes.infra.pipeline import format_value

from reference import (
    compile_graph,
    float32_bound,
    left_padded_batch,
    max_diff_on_tokens,
    ort_decode_logits,
    ort_logits,
    torch_logits,
)

# Measured: 1e-7 .. 4e-7 on logits of magnitude ~1 (tiny models agree with ORT to float32 rounding).
TOLERANCE = 2e-6

# Every layer different: 4 query heads in 2 KV groups -> (4, 2), (1, 1), (2, 2), (2, 1) heads/groups,
# FFN 96 -> 40, 96, 17, 60, hidden 64 -> 48 (random channels), then layer 1 removed.
KV = [[0, 1], [1], [0, 1], [0]]
HEADS = [[0, 1, 2, 3], [1], [0, 3], [0, 1]]  # numbered after prune-kv-groups
FFN_WIDTHS = [40, 96, 17, 60]
FFN = [sorted(np.random.default_rng(i).choice(96, size=n, replace=False).tolist()) for i, n in enumerate(FFN_WIDTHS)]
HIDDEN = sorted(np.random.default_rng(7).choice(64, size=48, replace=False).tolist())
MIXED = (
    f"prune-kv-groups{{keep={format_value(KV)}}},prune-heads{{keep={format_value(HEADS)}}},"
    f"prune-ffn{{keep={format_value(FFN)}}},slice-hidden{{keep={format_value(HIDDEN)}}},slnp,drop-layers{{layers=[1]}}"
)
EXPECTED_SHAPES = [(4, 2, 40), (2, 2, 17), (2, 1, 60)]  # (heads, KV groups, FFN) of layers 0, 2, 3
SANDWICH = ("gemma2", "gemma3", "glm4")
S_INV = [0.4, 0.55, 0.7, 0.85, 1.15, 1.3, 1.45, 1.6]  # one per post-norm, far from 1


def _check(path, model, tolerance=TOLERANCE):
    ids, mask = left_padded_batch(160)
    got = torch_logits(model, ids, mask)
    assert np.abs(got).max() > 0.1  # not a degenerate comparison
    assert max_diff_on_tokens(ort_logits(path, ids, mask), got, mask) <= tolerance


def _shapes(model):
    out = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        ffn = mlp.down_proj.in_features
        out.append((attention.q_proj.out_features // attention.head_dim,
                    attention.k_proj.out_features // attention.head_dim, ffn))
    return out


def test_every_layer_a_different_shape(exported_graph, family, tmp_path):
    _, path = exported_graph(family)
    compile_graph(path, MIXED, tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert _shapes(result.model) == EXPECTED_SHAPES
    assert [a.self_attn.num_key_value_groups for a in result.model.model.layers] == [2, 1, 2]
    assert result.model.model.embed_tokens.weight.shape == (160, 48)
    assert result.spec.origin == [0, 2, 3] and not result.spec.uniform
    _check(tmp_path / "p.onnx", result.model)


def test_layer_types_follow_the_original_indices(exported_graph, tmp_path):
    """Gemma3's only full-attention layer is 2: drop 0 and 1, and the kept layers 2, 3 must stay
    full and sliding (window 4, prompts of 9 tokens: a wrong type changes the logits)."""
    _, path = exported_graph("gemma3")
    compile_graph(path, "drop-layers{layers=[0,1]}", tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert result.model.config.layer_types == ["full_attention", "sliding_attention"]
    _check(tmp_path / "p.onnx", result.model)
    # The check can fail: the same weights with the types of the first two layers disagree.
    spec = dataclasses.replace(result.spec, config={**result.spec.config, "layer_types": ["sliding_attention"] * 2})
    wrong = build_student(spec).eval()
    wrong.load_state_dict(result.model.state_dict())
    ids, mask = left_padded_batch(160)
    assert max_diff_on_tokens(ort_logits(tmp_path / "p.onnx", ids, mask), torch_logits(wrong, ids, mask), mask) > 1e-3


def test_layer_origins_come_from_metadata_then_from_drop_layers_records(exported_graph, tmp_path):
    """The recorded LAYER_ORIGINS is what re-import reads; a graph without it falls back to the
    drop-layers records; a list that does not match the graph's layers is refused."""
    _, path = exported_graph("gemma3")
    compile_graph(path, "drop-layers{layers=[0,1]}", tmp_path / "p.onnx")
    graph = ir.load(str(tmp_path / "p.onnx"))
    records = graph.metadata_props.pop(contract.PASS_STATS)
    graph.metadata_props.pop(contract.LAYER_ORIGINS, None)
    graph.metadata_props[contract.LAYER_ORIGINS] = json.dumps([2, 3])
    result = reimport(graph)
    assert result.spec.origin == [2, 3]
    assert result.model.config.layer_types == ["full_attention", "sliding_attention"]
    graph.metadata_props.pop(contract.LAYER_ORIGINS)
    graph.metadata_props[contract.PASS_STATS] = records
    assert reimport(graph).spec.origin == [2, 3]
    graph.metadata_props[contract.LAYER_ORIGINS] = json.dumps([2])
    with pytest.raises(PanguLightError, match="layer_origins"):
        reimport(graph)


@pytest.mark.parametrize("family", SANDWICH)
def test_absorbed_post_norms_with_sliced_hidden(exported_graph, family, tmp_path):
    _, path = exported_graph(family)
    pipeline = (f"absorb-post-norm{{s_inv={format_value(S_INV)}}},prune-ffn{{keep_first=50}},"
                "slice-hidden{keep_first=40}")
    compile_graph(path, pipeline, tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    identities = [n for n, m in result.model.named_modules() if isinstance(m, torch.nn.Identity)]
    assert len(identities) == 8 and all("post" in n for n in identities)
    if family != "glm4":  # Gemma's embedding scale stays sqrt(64), the graph's constant
        assert float(result.model.model.embed_tokens.embed_scale) == 8.0
    _check(tmp_path / "p.onnx", result.model)


@pytest.mark.parametrize("family", SANDWICH)
def test_dropped_post_norms_and_layers(exported_graph, family, tmp_path):
    _, path = exported_graph(family)
    compile_graph(path, "drop-post-norm,prune-heads{per_group=1},drop-layers{layers=[0,3]}", tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert result.spec.origin == [1, 2] and len(result.spec.layers[0].identity_norms) == 2
    _check(tmp_path / "p.onnx", result.model)


def test_decode_graph(exported_graph, tmp_path):
    """A decode graph re-imports to the same model: ORT's prefill + greedy steps vs torch."""
    _, path = exported_graph("qwen2", kv_cache=True)
    compile_graph(path, f"prune-kv-groups{{keep={format_value(KV)}}},prune-ffn{{keep_first=30}}", tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert result.graph_kind == "decode"
    ids, mask = left_padded_batch(160)
    got, all_ids, all_mask = ort_decode_logits(tmp_path / "p.onnx", ids, mask, steps=3)
    assert max_diff_on_tokens(got, torch_logits(result.model, all_ids, all_mask), all_mask) <= TOLERANCE


def test_unpruned_graph_is_the_original_model(exported_graph):
    hf_model, path = exported_graph("llama")
    result = reimport(path)
    assert result.spec.uniform
    for name, value in hf_model.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], value), name


def test_per_layer_student_saves_and_loads(exported_graph, tmp_path):
    _, path = exported_graph("glm4")
    compile_graph(path, MIXED + ",drop-post-norm", tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert save_student(result.model, result.spec, tmp_path / "student") == "pangu-light"
    assert json.loads((tmp_path / "student" / STUDENT_FILE).read_text())["layers"][1]["num_heads"] == 2
    assert not (tmp_path / "student" / "config.json").exists()  # plain from_pretrained would mis-shape it
    _check(tmp_path / "p.onnx", load_student(tmp_path / "student"))
    with pytest.raises(PanguLightError, match="exists"):
        save_student(result.model, result.spec, tmp_path / "student")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_uniform_student_is_a_plain_hf_directory(exported_graph, family, tmp_path):
    """Same shape in every layer: AutoModelForCausalLM.from_pretrained loads it, no custom code.
    Gemma3 with a sliced hidden size: untied, the embedding carries sqrt(64) / sqrt(48)."""
    _, path = exported_graph(family)
    compile_graph(path, "prune-heads{per_group=1},prune-ffn{keep_first=50},slice-hidden{keep_first=48},slnp",
                  tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert result.spec.uniform
    assert save_student(result.model, result.spec, tmp_path / "hf") == "hf"
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert plain.config.hidden_size == 48 and plain.config.num_attention_heads == 2
    assert plain.config.intermediate_size == 50
    _check(tmp_path / "p.onnx", plain)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hidden_not_a_multiple_of_the_heads(exported_graph, family, tmp_path):
    """Hidden 42 with 4 query heads (head_dim 16): the model re-imports, but transformers refuses
    such a Llama/Gemma config, so even a uniform student is saved in the per-layer format."""
    _, path = exported_graph(family)
    compile_graph(path, "slice-hidden{keep_first=42}", tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert result.spec.uniform and not result.spec.standard_config
    assert [l.self_attn.q_proj.out_features for l in result.model.model.layers] == [64] * 4
    _check(tmp_path / "p.onnx", result.model)
    assert save_student(result.model, result.spec, tmp_path / "student") == "pangu-light"
    _check(tmp_path / "p.onnx", load_student(tmp_path / "student"))


def test_graph_without_source_config_is_refused(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    model = ir.load(path)
    del model.metadata_props["pangu_light.source_config"]
    with pytest.raises(PanguLightError, match="source_config"):
        reimport(model)


def test_missing_graph_is_one_clear_error(tmp_path):
    with pytest.raises(PanguLightError, match="no such file"):
        reimport(tmp_path / "none.onnx")


@pytest.mark.real_model
def test_smollm2_width_pruned(smollm2_graph, tmp_path):
    """SmolLM2-135M at hidden 448, 2 of 3 heads per group, FFN 1152, SLNP (6 heads do not divide
    448, so the config names gcd(448, 6) = 2 of them): re-imported logits equal ORT's within the
    bound of the export parity tests (float32_bound: 2e-4 + 3e-5 x max |logit|; a wrong re-import
    of any one projection moves the logits by more than 1)."""
    pipeline = "prune-heads{per_group=2},prune-ffn{keep_first=1152},slice-hidden{keep_first=448},slnp"
    compile_graph(smollm2_graph(), pipeline, tmp_path / "p.onnx")
    result = reimport(tmp_path / "p.onnx")
    assert _shapes(result.model) == [(6, 3, 1152)] * 30 and not result.spec.standard_config
    ids, mask = left_padded_batch(49152, lengths=(37, 20))
    expected = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert np.abs(expected).max() > 5
    assert max_diff_on_tokens(expected, torch_logits(result.model, ids, mask), mask) <= float32_bound(
        expected, mask=mask)
