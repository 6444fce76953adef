"""SmolLM2-135M (real_model): the fused int4 deployment has one GroupQueryAttention per layer and
151 MatMulNBits (30 layers x 5: packed q|k|v, o, gate, up, down; and the tied lm_head, int8), and
computes what the float32 graph with the dequantized weights computes."""

from __future__ import annotations

import pytest
from test_quantize import _dequantized_reference, _weight_matmuls

from pangu_light.deploy.build import DeployOptions, build_deployment

from reference import float32_bound, left_padded_batch, max_diff_on_tokens, ort_decode_logits


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_int4_equals_dequantized_graph(smollm2_graph, smollm2_model, tmp_path):
    path = smollm2_graph(kv_cache=True)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights="int4", accuracy_level=0))
    assert _weight_matmuls(path) == 211 and record["lm_head_quantized"]
    assert record["matmul_nbits"] == 151 and record["ops_after"]["GroupQueryAttention"] == 30
    _dequantized_reference(tmp_path / "d" / "model.onnx", tmp_path / "ref.onnx")
    ids, mask = left_padded_batch(smollm2_model.config.vocab_size, lengths=(12, 7, 4))
    got, got_ids, all_mask = ort_decode_logits(tmp_path / "d" / "model.onnx", ids, mask, steps=4)
    want, want_ids, _ = ort_decode_logits(tmp_path / "ref.onnx", ids, mask, steps=4)
    assert max_diff_on_tokens(got, want, all_mask) <= float32_bound(want, mask=all_mask)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_fused_fp32_equals_unfused_decode_graph(smollm2_graph, smollm2_model, tmp_path):
    """The fused fp32 graph (30 GQA, 60 SkipSimplifiedLayerNorm, packed q|k|v) against the
    export it was built from: batch 3 left-padded, prefill + 4 greedy steps, same tokens."""
    path = smollm2_graph(kv_cache=True)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights="fp32", max_length=256))
    ops = record["ops_after"]
    assert ops["GroupQueryAttention"] == 30 and ops["SkipSimplifiedLayerNormalization"] == 60
    assert record["pack_qkv"]["packed"] == 30 and record["io_kind"] == "gqa-shared-buffer"
    ids, mask = left_padded_batch(smollm2_model.config.vocab_size, lengths=(12, 7, 4))
    got, got_ids, all_mask = ort_decode_logits(tmp_path / "d" / "model.onnx", ids, mask, steps=4)
    want, want_ids, _ = ort_decode_logits(path, ids, mask, steps=4)
    assert max_diff_on_tokens(got, want, all_mask) <= float32_bound(want, mask=all_mask)
    assert (got_ids == want_ids).all()
