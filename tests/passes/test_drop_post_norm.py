"""drop-post-norm: the graph equals the PyTorch model whose post-norms are the identity."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from pangu_light.passes.analysis.model_map import ModelMap

from reference import (
    compile_graph,
    decode_diff,
    graph_bytes,
    left_padded_batch,
    max_diff_on_tokens,
    ort_logits,
    torch_logits,
)
from reference_norm import NODES_PER_NORM, gamma_names, torch_identity_post_norms

TOLERANCE = 1e-5
SANDWICH = ["gemma2", "gemma3", "glm4"]


@pytest.mark.parametrize("family", SANDWICH)
def test_no_cache_matches_torch_identity_norms(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    original = ir.load(path)
    dropped, report = compile_graph(path, "drop-post-norm", tmp_path / "p.onnx")
    assert report.records[0].stats == {"post_norms_removed": 8, "nodes_removed": 8 * NODES_PER_NORM[family]}
    assert len(list(original.graph)) - len(list(dropped.graph)) == 8 * NODES_PER_NORM[family]
    layers = ModelMap.from_model(dropped).layers
    assert [list(layer.norms) for layer in layers] == [["pre_attn", "pre_ffn"]] * 4
    assert not set(gamma_names(hf_model)) & set(dropped.graph.initializers)
    # The residual Adds now read o_proj/down_proj directly, and say who re-wired them.
    for layer in layers:
        attn_add, ffn_add = layer.residual_adds
        assert layer.attention.o.output in attn_add.inputs and layer.ffn.down.output in ffn_add.inputs
        assert attn_add.metadata_props["pangu_light.pass"] == "drop-post-norm"
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert max_diff_on_tokens(got, torch_logits(torch_identity_post_norms(hf_model), ids, mask), mask) <= TOLERANCE
    assert max_diff_on_tokens(got, torch_logits(hf_model, ids, mask), mask) > 1e-3


@pytest.mark.parametrize("family", SANDWICH)
def test_decode_matches_torch_identity_norms(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    compile_graph(path, "drop-post-norm", tmp_path / "p.onnx")
    assert decode_diff(tmp_path / "p.onnx", torch_identity_post_norms(hf_model)) <= TOLERANCE


def test_pre_norm_model_has_nothing_to_remove(exported_graph, tmp_path):
    _, path = exported_graph("qwen3")
    model, report = compile_graph(path, "drop-post-norm", tmp_path / "p.onnx")
    assert not report.records[0].modified
    assert report.records[0].stats == {"post_norms_removed": 0, "note": "no post-norms to remove"}
    assert graph_bytes(model) == graph_bytes(ir.load(path))


def test_running_twice_changes_nothing_the_second_time(exported_graph, tmp_path):
    _, path = exported_graph("glm4")
    once, _ = compile_graph(path, "drop-post-norm", tmp_path / "once.onnx")
    twice, report = compile_graph(tmp_path / "once.onnx", "drop-post-norm", tmp_path / "twice.onnx")
    assert not report.records[0].modified
    assert graph_bytes(twice) == graph_bytes(once)
