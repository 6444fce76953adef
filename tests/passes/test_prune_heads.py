"""prune-heads: the rewritten graph equals the same heads removed from the PyTorch module, and
the original model with the removed heads' o_proj columns zeroed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import format_value

from reference import (
    assert_refused,
    assert_unchanged,
    compile_graph,
    decode_diff,
    graph_bytes,
    left_padded_batch,
    max_diff_on_tokens,
    no_cache_diff,
    ort_logits,
    torch_logits,
)
from reference_width import torch_prune_heads, torch_zero_heads

TOLERANCE = 1e-5
# Tiny models: 4 query heads in 2 KV groups (0,1 | 2,3). Layers end with 2, 2, 4, 2 heads.
KEEP = [[0, 2], [1, 3], [0, 1, 2, 3], [1, 2]]
PIPELINE = f"prune-heads{{keep={format_value(KEEP)}}}"


def test_no_cache_matches_torch_and_zeroed_heads(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    pruned, report = compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    assert report.records[0].stats["heads_removed"] == 6
    model_map = ModelMap.from_model(pruned)
    assert [layer.attention.num_heads for layer in model_map.layers] == [2, 2, 4, 2]
    assert [layer.attention.num_kv_heads for layer in model_map.layers] == [2, 2, 2, 2]
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert max_diff_on_tokens(got, torch_logits(torch_prune_heads(hf_model, KEEP), ids, mask), mask) <= TOLERANCE
    assert max_diff_on_tokens(got, torch_logits(torch_zero_heads(hf_model, KEEP), ids, mask), mask) <= TOLERANCE
    assert max_diff_on_tokens(got, torch_logits(hf_model, ids, mask), mask) > 1e-3


def test_decode_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    assert decode_diff(tmp_path / "p.onnx", torch_prune_heads(hf_model, KEEP)) <= TOLERANCE


def test_per_group_keeps_the_first_heads_of_every_group(exported_graph, tmp_path):
    hf_model, path = exported_graph("qwen2")  # q bias too
    pruned, _ = compile_graph(path, "prune-heads{per_group=1}", tmp_path / "p.onnx")
    attention = ModelMap.from_model(pruned).layers[0].attention
    assert attention.q.weight.shape == ir.Shape([32, 64]) and attention.q.bias.shape == ir.Shape([32])
    assert attention.o.weight.shape == ir.Shape([64, 32])
    assert attention.q.weight.metadata_props["pangu_light.pass"] == "prune-heads"
    assert all(c.value.metadata_props["pangu_light.pass"] == "prune-heads"
               for c in attention.head_count_constants if c.what != "kv_heads")
    assert no_cache_diff(tmp_path / "p.onnx", torch_prune_heads(hf_model, [[0, 2]] * 4)) <= TOLERANCE


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_q_k_norms_survive(exported_graph, family, tmp_path):
    _, path = exported_graph(family)
    original = ModelMap.from_model(ir.load(path))
    pruned, _ = compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    for before, after in zip(original.layers, ModelMap.from_model(pruned).layers):
        for role in ("q_norm", "k_norm"):
            old, new = getattr(before.attention, role), getattr(after.attention, role)
            assert new is not None and new.gamma.shape == ir.Shape([16])
            np.testing.assert_array_equal(old.gamma.const_value.numpy(), new.gamma.const_value.numpy())


@pytest.mark.parametrize("options", ["per_group=2", "keep=[[0,1,2,3],[0,1,2,3],[0,1,2,3],[3,2,1,0]]"])
def test_keeping_everything_changes_nothing(exported_graph, options, tmp_path):
    _, path = exported_graph("llama", kv_cache=True)
    assert_unchanged(path, f"prune-heads{{{options}}}", tmp_path / "p.onnx")


@pytest.mark.parametrize(
    "options, message",
    [
        ("keep=[[0,1],[0,2],[0,2],[0,2]]", "layer 0 keeps no query head of KV group 1 (heads 2..3)"),
        ("keep=[[0,2],[0,2,3],[0,2],[0,2]]", r"layer 1 keeps \[1, 2\] query heads in its KV groups"),
        ("keep=[[0,4],[0,2],[0,2],[0,2]]", "layer 0: query head 4 does not exist; the layer has 4"),
        ("keep=[[0,-1],[0,2],[0,2],[0,2]]", "layer 0: query head -1 does not exist"),
        ("keep=[[0,2],[0,2],[0,2]]", "keep has 3 entries but the model has 4 layers"),
        ("keep=[[0,2],[0,2],[],[0,2]]", "layer 2 keeps no query heads"),
        ("keep=[[0,0,2,2],[0,2],[0,2],[0,2]]", "layer 0 names query head 0 twice"),
        ("per_group=3", "per_group=3 must be between 1 and the query heads per KV group; layer 0 has 2"),
        ("per_group=0", "per_group=0 must be between 1"),
        ("per_group=1,keep=[[0,2],[0,2],[0,2],[0,2]]", "give exactly one of keep"),
        ("plan=false", "give exactly one of keep"),
        ("plan=true", "plan=true but the graph carries no plan"),
    ],
)
def test_bad_requests_are_clear_errors(exported_graph, options, message):
    _, path = exported_graph("llama")
    assert_refused(path, f"prune-heads{{{options}}}", message)


def test_refuses_a_weight_read_elsewhere(exported_graph):
    _, path = exported_graph("llama")
    model = ir.load(path)
    model_map = ModelMap.from_model(model)
    # Layer 3's q_proj now reads layer 0's weight too (a tied weight, as no exporter writes).
    shared = model_map.layers[0].attention.q
    model_map.layers[3].attention.q.transpose.replace_input_with(0, shared.weight)
    expected = graph_bytes(model)
    with pytest.raises(PanguLightError, match="q_proj.weight is also read outside"):
        run_pipeline(model, "prune-heads{per_group=1}")
    assert graph_bytes(model) == expected
