"""SmolLM2-135M (real_model): int4 deployment replaces all 211 weight MatMuls (30 layers x 7 and
the tied lm_head) and computes what the float32 graph with the dequantized weights computes."""

from __future__ import annotations

import pytest
from test_quantize import _dequantized_reference, _weight_matmuls

from pangu_light.deploy.build import DeployOptions, build_deployment

from reference import float32_bound, left_padded_batch, max_diff_on_tokens, ort_logits


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_int4_equals_dequantized_graph(smollm2_graph, smollm2_model, tmp_path):
    path = smollm2_graph(kv_cache=False)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights="int4", accuracy_level=0))
    assert record["matmul_nbits"] == _weight_matmuls(path) == 211 and record["lm_head_quantized"]
    _dequantized_reference(tmp_path / "d" / "model.onnx", tmp_path / "ref.onnx")
    ids, mask = left_padded_batch(smollm2_model.config.vocab_size, lengths=(12, 7, 4))
    got = ort_logits(tmp_path / "d" / "model.onnx", ids, mask)
    want = ort_logits(tmp_path / "ref.onnx", ids, mask)
    assert max_diff_on_tokens(got, want, mask) <= float32_bound(want, mask=mask)
