"""fold-weight-transpose: the folded graph computes the same function as the exported one (tiny
models of every family, no-cache and decode), and every weight MatMul reads an initializer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.passes.deploy.fold_weight_transpose import FoldWeightTransposePass

from families import FAMILIES
from reference import left_padded_batch, max_diff_on_tokens, ort_decode_logits, ort_logits


def _weight_transposes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].is_initializer()]


def _fold(path, out, shared=False):
    model = ir.load(path)
    fold = FoldWeightTransposePass({"shared": shared})
    result = fold(model)
    ir.save(model, out)
    return model, fold.stats, result.modified


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_graph_equals_export(family, exported_graph, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=False)
    before = ir.load(path)
    model, stats, modified = _fold(path, tmp_path / "f.onnx", shared=True)
    assert modified and not _weight_transposes(model)
    assert stats["transposes_removed"] == len(_weight_transposes(before))
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    want = ort_logits(path, ids, mask)
    got = ort_logits(tmp_path / "f.onnx", ids, mask)
    # A transposed copy holds the same float32 bits: only a kernel reading a different layout
    # could move the result, so the bound is float32 rounding on the largest logit.
    assert max_diff_on_tokens(got, want, mask) <= 1e-6 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_decode_graph_equals_export(family, exported_graph, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    _fold(path, tmp_path / "f.onnx", shared=True)
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    want, want_ids, _ = ort_decode_logits(path, ids, mask, steps=4)
    got, got_ids, all_mask = ort_decode_logits(tmp_path / "f.onnx", ids, mask, steps=4)
    assert np.array_equal(got_ids.numpy(), want_ids.numpy())
    assert max_diff_on_tokens(got, want, all_mask) <= 1e-6 * max(1.0, float(np.abs(want).max()))


def test_shared_weight_is_left_alone_unless_asked(exported_graph, tmp_path):
    """Llama's tied embedding: the Gather and the lm_head's Transpose read one initializer."""
    _, path = exported_graph("llama", kv_cache=True)
    model, stats, _ = _fold(path, tmp_path / "a.onnx", shared=False)
    (kept,) = _weight_transposes(model)
    tied = kept.inputs[0]
    assert stats["skipped_shared"] == 1 and {u.node.op_type for u in tied.uses()} == {"Gather", "Transpose"}
    model, stats, _ = _fold(path, tmp_path / "b.onnx", shared=True)
    assert not _weight_transposes(model) and "skipped_shared" not in stats
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].is_initializer())
    embedding = gather.inputs[0].const_value.numpy()
    head = next(v for k, v in model.graph.initializers.items() if k == f"{gather.inputs[0].name}.T")
    assert np.array_equal(head.const_value.numpy(), embedding.T)  # the lm_head's own copy


def test_second_run_changes_nothing(exported_graph, tmp_path):
    _, path = exported_graph("qwen2", kv_cache=True)
    model, _, _ = _fold(path, tmp_path / "a.onnx", shared=True)
    before = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    assert not FoldWeightTransposePass({"shared": True})(model).modified
    assert ir.serde.serialize_model(model).SerializeToString(deterministic=True) == before


def test_transpose_of_a_graph_input_is_not_folded():
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Transpose", [x], attributes={"perm": [1, 0]})
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=9)
    assert not FoldWeightTransposePass()(model).modified
    assert [n.op_type for n in model.graph] == ["Transpose"]
