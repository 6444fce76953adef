"""prune-ffn: the rewritten graph equals the same neurons removed from the PyTorch module, and
the original model with the removed neurons' down_proj columns zeroed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.pipeline import format_value

from reference import (
    assert_refused,
    assert_unchanged,
    compile_graph,
    decode_diff,
    left_padded_batch,
    max_diff_on_tokens,
    no_cache_diff,
    ort_logits,
    torch_logits,
)
from reference_width import torch_prune_ffn, torch_zero_ffn

TOLERANCE = 1e-5
# Tiny models: FFN width 96. Layers end with 40, 96, 17, 60 neurons, chosen at random.
WIDTHS = [40, 96, 17, 60]
KEEP = [sorted(np.random.default_rng(i).choice(96, size=n, replace=False).tolist()) for i, n in enumerate(WIDTHS)]
PIPELINE = f"prune-ffn{{keep={format_value(KEEP)}}}"


def test_no_cache_matches_torch_and_zeroed_neurons(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    pruned, report = compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    assert report.records[0].stats["neurons_removed"] == 4 * 96 - sum(WIDTHS)
    model_map = ModelMap.from_model(pruned)
    assert [layer.ffn.intermediate_size for layer in model_map.layers] == WIDTHS
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert max_diff_on_tokens(got, torch_logits(torch_prune_ffn(hf_model, KEEP), ids, mask), mask) <= TOLERANCE
    assert max_diff_on_tokens(got, torch_logits(torch_zero_ffn(hf_model, KEEP), ids, mask), mask) <= TOLERANCE
    assert max_diff_on_tokens(got, torch_logits(hf_model, ids, mask), mask) > 1e-3


def test_decode_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    assert decode_diff(tmp_path / "p.onnx", torch_prune_ffn(hf_model, KEEP)) <= TOLERANCE


def test_fused_gate_up_keeps_both_halves(exported_graph, tmp_path):
    _, path = exported_graph("glm4")
    original = ModelMap.from_model(ir.load(path)).layers[0].ffn.gate.weight.const_value.numpy()
    pruned, _ = compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    ffn = ModelMap.from_model(pruned).layers[0].ffn
    assert ffn.fused_gate_up and ffn.gate.weight.shape == ir.Shape([80, 64])
    np.testing.assert_array_equal(ffn.gate.weight.const_value.numpy()[:40], original[KEEP[0]])
    np.testing.assert_array_equal(ffn.gate.weight.const_value.numpy()[40:], original[96 + np.array(KEEP[0])])
    assert ffn.gate.weight.metadata_props["pangu_light.pass"] == "prune-ffn"


def test_keep_first(exported_graph, tmp_path):
    hf_model, path = exported_graph("mistral")
    pruned, report = compile_graph(path, "prune-ffn{keep_first=48}", tmp_path / "p.onnx")
    assert report.records[0].stats["ffn"] == "96->48"
    assert no_cache_diff(tmp_path / "p.onnx", torch_prune_ffn(hf_model, [list(range(48))] * 4)) <= TOLERANCE


@pytest.mark.parametrize("options", ["keep_first=96", f"keep={format_value([list(range(96))[::-1]] * 4)}"])
def test_keeping_everything_changes_nothing(exported_graph, options, tmp_path):
    _, path = exported_graph("glm4")
    assert_unchanged(path, f"prune-ffn{{{options}}}", tmp_path / "p.onnx")


@pytest.mark.parametrize(
    "options, message",
    [
        ("keep=[[0],[1],[96],[2]]", "layer 2: FFN neuron 96 does not exist; the layer has 96 (0..95)"),
        ("keep=[[0],[1],[],[2]]", "layer 2 keeps no FFN neurons"),
        ("keep=[[0],[1],[2]]", "keep has 3 entries but the model has 4 layers"),
        ("keep=[[0,0],[1],[2],[3]]", "layer 0 names FFN neuron 0 twice"),
        ("keep_first=0", "keep_first=0 must be between 1 and the FFN width of every layer"),
        ("keep_first=97", "keep_first=97 must be between 1"),
        ("keep_first=4,plan=true", "give exactly one of keep"),
    ],
)
def test_bad_requests_are_clear_errors(exported_graph, options, message):
    _, path = exported_graph("llama")
    assert_refused(path, f"prune-ffn{{{options}}}", message)
