"""GPTQ weights (deploy/gptq.py): the algorithm against an independent column-by-column solver,
round to nearest as ONNX Runtime's quantizer writes it, the packing MatMulNBits reads, the Grams
against PyTorch activations, and `deploy --quant-method gptq` end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

from pangu_light.core.errors import PanguLightError
from pangu_light.deploy.build import DeployOptions, build_deployment
from pangu_light.deploy.gptq import collect_input_grams, gptq_quantize, overwrite_packed, round_to_nearest
from pangu_light.deploy.quantize import dequantize_matmul_nbits, quantize_weights
from pangu_light.passes.deploy.fold_weight_transpose import FoldWeightTransposePass

from reference import ort_decode_logits, save_char_tokenizer


def _correlated(rng, tokens: int, k: int) -> np.ndarray:
    """Inputs whose channels are strongly correlated and unevenly scaled (as residual streams are)."""
    mixing = rng.standard_normal((k // 4, k)) * np.exp(rng.standard_normal(k))
    return rng.standard_normal((tokens, k // 4)) @ mixing + 0.05 * rng.standard_normal((tokens, k))


def _reference_gptq(weight, gram, bits, block_size, damp):
    """Row by row with the explicit inverse (the OBS update of Frantar et al.), in act order
    (decreasing H[k, k]) with each block's scale fixed from the original weights: after input row
    k is quantized, w_j -= Hinv[j, k] (w_k - q_k) / Hinv[k, k] for every row, and row/column k is
    eliminated from Hinv (so rows already quantized get no more updates). No Cholesky factor, no
    lazy chunks."""
    k, n = weight.shape
    z = 2 ** (bits - 1)
    w = weight.astype(np.float64).copy()
    scales = []
    for start in range(0, k, block_size):
        block = w[start:start + block_size]  # [width, N]
        largest = block[np.abs(block).argmax(axis=0), np.arange(n)]
        scales.append(np.where(largest == 0, 1.0, largest / -z))
    h = gram.astype(np.float64) + damp * np.mean(np.diag(gram)) * np.eye(k)
    hinv = np.linalg.inv(h)
    out = np.zeros_like(w)
    for row in np.argsort(-np.diag(h), kind="stable"):
        s = scales[row // block_size]
        out[row] = (np.clip(np.round(w[row] / s) + z, 0, 2 * z - 1) - z) * s
        error = (w[row] - out[row]) / hinv[row, row]
        w -= np.outer(hinv[:, row], error)
        hinv = hinv - np.outer(hinv[:, row], hinv[row, :]) / hinv[row, row]
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 80])  # 80: the last block narrower than 32
def test_gptq_equals_column_by_column_solver(bits, k):
    rng = np.random.default_rng(bits + k)
    x = _correlated(rng, 600, k)
    weight = rng.standard_normal((k, 24))
    gram = x.T @ x
    got = gptq_quantize(weight, gram, bits=bits, block_size=32, damp=0.01, chunk=64).dequantized()
    want = _reference_gptq(weight, gram, bits, 32, 0.01)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
    # the chunking is bookkeeping only
    same = gptq_quantize(weight, gram, bits=bits, block_size=32, damp=0.01, chunk=17).dequantized()
    np.testing.assert_allclose(same, got, rtol=0, atol=1e-9 * np.abs(got).max())


def test_gptq_without_correlation_is_round_to_nearest():
    """H = I (no damping): no row's error has anywhere to go, so GPTQ is per-block round to nearest."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 40))
    got = gptq_quantize(weight, np.eye(64), bits=4, block_size=32, damp=1e-12)
    want = round_to_nearest(weight, bits=4, block_size=32)
    np.testing.assert_array_equal(got.q, want.q)
    np.testing.assert_array_equal(got.scales, want.scales)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(1)
    k = 128
    x = _correlated(rng, 2000, k)
    weight = rng.standard_normal((k, 64))
    gptq = gptq_quantize(weight, x.T @ x, bits=4, block_size=32).dequantized()
    rtn = round_to_nearest(weight, bits=4, block_size=32).dequantized()
    error = {name: np.linalg.norm(x @ (weight - q)) for name, q in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.5 * error["rtn"], error


def _quantized_matmul(weight: np.ndarray, bits: int):
    """(model, its MatMulNBits node, its initializers) of y = x W quantized by ONNX Runtime's quantizer."""
    k, n = weight.shape
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                                   [numpy_helper.from_array(weight, "w")])
    proto = quantize_weights(onnx.helper.make_model(graph), bits=bits, block_size=32)
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    return proto, node, {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_round_to_nearest_equals_onnxruntime_quantizer():
    """The grid GPTQ rounds onto is the one ONNX Runtime's quantizer writes (symmetric, per block)."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((80, 24)).astype(np.float32)
    node, arrays = _quantized_matmul(weight, bits=4)[1:]
    np.testing.assert_allclose(dequantize_matmul_nbits(node, arrays),
                               round_to_nearest(weight, bits=4, block_size=32).dequantized(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_what_matmul_nbits_reads(bits):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((80, 24)).astype(np.float32)
    proto = _quantized_matmul(weight, bits)[0]
    gram = _correlated(rng, 400, 80)
    quantized = gptq_quantize(weight, gram.T @ gram, bits=bits, block_size=32)
    assert overwrite_packed(proto, {"w": quantized}, {"y": "w"}) == 1
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(dequantize_matmul_nbits(node, arrays), quantized.dequantized(), rtol=1e-6, atol=0)
    assert not np.allclose(quantized.dequantized(), round_to_nearest(weight, bits=bits).dequantized())


def test_input_grams_equal_torch_activations(exported_graph):
    """The Gram of q_proj's and down_proj's inputs through the graph equals the one from PyTorch
    hooks on the same real tokens, padding left out (float32 sums: relative 1e-5 of the largest entry)."""
    hf_model, path = exported_graph("llama", kv_cache=True)
    model = ir.load(path)
    FoldWeightTransposePass({"shared": True})(model)
    layer = hf_model.model.layers[1]
    weights = {}
    for node in model.graph:  # the folded weights of layer 1's q_proj and down_proj, by their torch values
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            array = node.inputs[1].const_value.numpy()
            for name, module in (("q", layer.self_attn.q_proj), ("down", layer.mlp.down_proj)):
                torch_weight = module.weight.detach().numpy().T
                if array.shape == torch_weight.shape and np.array_equal(array, torch_weight):
                    weights[name] = node.inputs[1].name
    assert set(weights) == {"q", "down"}
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, hf_model.config.vocab_size, size=(3, 12))
    padded = np.ones((1, 12), np.int64)
    padded[:, 8:] = 0  # the last 4 positions of the third window are padding: they must not count
    batches = [(tokens[:2], np.ones((2, 12), np.int64)), (tokens[2:], padded)]
    grams = collect_input_grams(model, weights.values(), batches)
    seen = {"q": [], "down": []}

    def keep(name):
        return lambda module, inputs, output: seen[name].append(inputs[0].reshape(-1, inputs[0].shape[-1]))

    hooks = [layer.self_attn.q_proj.register_forward_hook(keep("q")),
             layer.mlp.down_proj.register_forward_hook(keep("down"))]
    with torch.no_grad():
        hf_model(torch.tensor(tokens[:2]))
        hf_model(torch.tensor(tokens[2:, :8]))  # right padding: the real tokens never see it
    for hook in hooks:
        hook.remove()
    for name, weight in weights.items():
        x = torch.cat(seen[name]).double().numpy()
        want = x.T @ x
        np.testing.assert_allclose(grams[weight], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_deploy_gptq_end_to_end(exported_graph, tmp_path):
    """deploy --quant-method gptq: the same nodes as round to nearest, other weights, and on the
    calibration tokens themselves the logits nearer the float32 graph's than round to nearest's."""
    hf_model, path = exported_graph("llama", kv_cache=True)
    vocab = hf_model.config.vocab_size
    calibration = np.random.default_rng(6).integers(0, vocab, size=(8, 32))
    rtn = build_deployment(path, tmp_path / "rtn", DeployOptions(weights="int4", lm_head_weights="int4"))
    gptq = build_deployment(path, tmp_path / "gptq", DeployOptions(weights="int4", lm_head_weights="int4",
                                                                   quant_method="gptq"), calibration=calibration)
    assert gptq["ops_after"] == rtn["ops_after"]
    assert gptq["gptq"]["weights"] == gptq["matmul_nbits"] == rtn["matmul_nbits"]
    assert gptq["gptq"]["calibration"]["windows"] == 8
    ids = torch.from_numpy(calibration[:3])
    mask = torch.ones_like(ids)
    want, _, _ = ort_decode_logits(path, ids, mask, steps=0)
    errors = {}
    for name in ("rtn", "gptq"):
        got, _, _ = ort_decode_logits(tmp_path / name / "model.onnx", ids, mask, steps=0)
        errors[name] = float(np.sqrt(np.mean((got - want) ** 2)))
    assert errors["gptq"] < errors["rtn"], errors


def test_gptq_options_checked(exported_graph, tmp_path):
    _, path = exported_graph("llama", kv_cache=True)
    with pytest.raises(PanguLightError, match="needs --weights int8/int4"):
        DeployOptions(weights="fp32", quant_method="gptq").check()
    with pytest.raises(PanguLightError, match="drop --asymmetric"):
        DeployOptions(quant_method="gptq", symmetric=False).check()
    with pytest.raises(PanguLightError, match="not one of"):
        DeployOptions(quant_method="awq").check()
    with pytest.raises(PanguLightError, match="not positive definite|positive"):
        gptq_quantize(np.ones((4, 2)), -np.eye(4), damp=0.0)


def test_command_gptq_from_text(exported_graph, tmp_path, capsys):
    """`deploy --quant-method gptq` cuts its calibration windows from text with a tokenizer (here
    --tokenizer: a character-level one, so real text maps into the tiny vocabulary)."""
    from pangu_light.tools.cli import main

    _, path = exported_graph("llama", kv_cache=True)
    save_char_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "deploy"
    args = ["deploy", str(path), "-o", str(out), "--quant-method", "gptq", "--calib-samples", "3",
            "--calib-seq-len", "24", "--tokenizer", str(tmp_path / "tokenizer")]
    assert main(args) == 0
    record = json.loads((out / "deploy.json").read_text())
    assert record["gptq"]["calibration"] == {"data": "wiki", "windows": 3, "seq_len": 24}
    assert record["gptq"]["weights"] == record["matmul_nbits"] > 0
    assert "GPTQ:" in capsys.readouterr().out
    assert main(["deploy", str(path), "-o", str(tmp_path / "x"), "--quant-method", "gptq", "--asymmetric"]) == 2
    assert "drop --asymmetric" in capsys.readouterr().err


def test_auto_takes_gptq_where_the_text_is_at_hand_and_says_why_not_elsewhere(exported_graph, tmp_path, capsys):
    """--quant-method auto (the CLI's default): GPTQ where the tokenizer and the text are found; round
    to nearest, with the reason in the record and on stdout, without a tokenizer or with --asymmetric."""
    from pangu_light.tools.cli import main

    _, path = exported_graph("llama", kv_cache=True)
    save_char_tokenizer(tmp_path / "tokenizer")
    small = ["--calib-samples", "3", "--calib-seq-len", "24"]

    def deploy(name: str, *args: str) -> dict:
        assert main(["deploy", str(path), "-o", str(tmp_path / name), "--weights", "int4", *small, *args]) == 0
        return json.loads((tmp_path / name / "deploy.json").read_text())

    record = deploy("auto", "--tokenizer", str(tmp_path / "tokenizer"))
    assert record["options"]["quant_method"] == "gptq" and "quant_method_fallback" not in record
    assert record["gptq"]["weights"] == record["matmul_nbits"] > 0
    assert "GPTQ:" in capsys.readouterr().out
    record = deploy("asymmetric", "--tokenizer", str(tmp_path / "tokenizer"), "--asymmetric")
    assert record["options"]["quant_method"] == "rtn" and "gptq" not in record
    assert "symmetric" in record["quant_method_fallback"]
    record = deploy("no-tokenizer")  # the tiny model was exported without one
    assert record["options"]["quant_method"] == "rtn" and "gptq" not in record
    assert "tokenizer" in record["quant_method_fallback"]
    assert "round to nearest, not GPTQ" in capsys.readouterr().out
