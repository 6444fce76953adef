"""int8/int4 deployment graphs: every weight MatMul became MatMulNBits (widths that are not a
multiple of the block size included), each dequantized weight is within half a block scale of
the float32 weight, and the quantized graph computes what the float32 graph computes with those
dequantized weights (accuracy_level 0: float32 compute), prefill and 4 decode steps, batch 3
left-padded. Built with ``fuse=False`` (the export's seven MatMuls per layer); the fused and
packed graphs are quantized in ``test_deploy_fused.py``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from pangu_light.core.errors import PanguLightError
from pangu_light.deploy.build import DeployOptions, build_deployment
from pangu_light.deploy.quantize import dequantize_matmul_nbits, quantize_weights
from pangu_light.passes.deploy.fold_weight_transpose import FoldWeightTransposePass

from reference import compile_graph, left_padded_batch, max_diff_on_tokens, ort_decode_logits

# Tiny pruned shape: hidden 50, FFN 70 (neither a multiple of 32), q/o width 64.
PRUNED = "slice-hidden{keep_first=50},prune-ffn{keep_first=70}"


@pytest.fixture(scope="module")
def pruned_llama(exported_graph, tmp_path_factory):
    hf_model, path = exported_graph("llama", kv_cache=True)
    out = tmp_path_factory.mktemp("pruned") / "pruned-kv.onnx"
    compile_graph(path, PRUNED, out)
    return hf_model.config.vocab_size, out


def _weight_matmuls(path) -> int:
    """Independently of the deploy code: MatMuls whose second input is Transpose(initializer)."""
    model = ir.load(path)
    return sum(
        1 for n in model.graph
        if n.op_type == "MatMul" and n.inputs[1].producer() is not None
        and n.inputs[1].producer().op_type == "Transpose" and n.inputs[1].producer().inputs[0].is_initializer()
    )


def _dequantized_reference(path, out) -> None:
    """The deployment graph with each MatMulNBits replaced by MatMul(x, dequantized weight)."""
    model = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            name = node.name + ".dequantized"
            model.graph.initializer.append(numpy_helper.from_array(dequantize_matmul_nbits(node, arrays), name))
            node = onnx.helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))


@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantized_graph_equals_dequantized_fp32_graph(weights, symmetric, pruned_llama, tmp_path):
    vocab, path = pruned_llama
    options = DeployOptions(weights=weights, accuracy_level=0, symmetric=symmetric, fuse=False)
    record = build_deployment(path, tmp_path / "d", options)
    deployed = tmp_path / "d" / "model.onnx"
    # every weight MatMul of the pruned graph (7 per layer x 4 layers + the tied lm_head)
    assert record["matmul_nbits"] == _weight_matmuls(path) == 29
    _dequantized_reference(deployed, tmp_path / "ref.onnx")
    ids, mask = left_padded_batch(vocab)
    got, got_ids, all_mask = ort_decode_logits(deployed, ids, mask, steps=4)
    want, want_ids, _ = ort_decode_logits(tmp_path / "ref.onnx", ids, mask, steps=4)
    fp32, _, _ = ort_decode_logits(path, ids, mask, steps=4)
    scale = float(np.abs(want).max())
    # Same weights, float32 compute in both: only the summation order differs (K <= 96 terms).
    bound = 1e-5 * max(1.0, scale)
    assert np.array_equal(got_ids.numpy(), want_ids.numpy())
    assert max_diff_on_tokens(got, want, all_mask) <= bound
    # ...and the check can fail: quantisation itself moves the logits far more than the bound.
    if weights == "int4":
        assert max_diff_on_tokens(fp32[:, : ids.shape[1]], want[:, : ids.shape[1]], mask) > 20 * bound


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantized_weight_error_bound(bits, symmetric, pruned_llama):
    """Round to nearest: |W - W_deq| <= |s| / 2 per element of each block. Symmetric uses the
    signed range [-2**(b-1), 2**(b-1) - 1] with s = (signed max-|.| element) / -2**(b-1), so an
    element of the other sign beyond (2**(b-1) - 1/2) |s| is clamped to 2**(b-1) - 1: its error
    is |w| - (2**(b-1) - 1) |s| (at most |s|). Checked on K = 50 and 70 (not multiples of 32)."""
    _, path = pruned_llama
    model = ir.load(path)
    FoldWeightTransposePass({"shared": True})(model)
    proto = ir.serde.serialize_model(model)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    quantized = quantize_weights(proto, bits=bits, block_size=32, symmetric=symmetric, accuracy_level=0)
    arrays = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    ks, top = set(), 2 ** (bits - 1) - 1
    for node in (n for n in quantized.graph.node if n.op_type == "MatMulNBits"):
        original = weights[node.input[1][: -len(f"_Q{bits}")]].astype(np.float64)
        deq = dequantize_matmul_nbits(node, arrays)
        k, n = original.shape
        ks.add(k)
        blocks = -(-k // 32)
        scales = np.abs(arrays[node.input[2]].reshape(n, blocks)).repeat(32, axis=1)[:, :k].T.astype(np.float64)
        allowed = scales / 2
        if symmetric:
            clamped = np.abs(original) > (top + 0.5) * scales
            allowed = np.where(clamped, np.abs(original) - top * scales, allowed)
        error = np.abs(deq - original)
        # plus float32 rounding of (q - z) * s, at most one unit in the last place of |w|
        assert np.all(error <= allowed + np.abs(original) * 2.0**-23), node.name
        assert error.max() > 0  # it really was quantized
    assert {50, 70} <= ks  # widths that are not a multiple of 32 went through


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied lm_head
def test_lm_head_kept_float32_on_request(family, exported_graph, tmp_path):
    _, path = exported_graph(family, kv_cache=True)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights="int4", quantize_lm_head=False, fuse=False))
    model = onnx.load(str(tmp_path / "d" / "model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers["logits"].op_type == "MatMul"
    assert record["matmul_nbits"] == _weight_matmuls(path) - 1 and not record["lm_head_quantized"]
    if family == "llama":  # tied: not folded, so the matrix is stored once
        assert producers[producers["logits"].input[1]].op_type == "Transpose"


def test_accuracy_level_4_within_activation_quantization_bound():
    """accuracy_level 4 also quantizes each block of 32 activations to int8 (scale max|a|/127),
    so |a - a_q| <= max|a_block| / 254 per element and, to first order,
    |y - x @ W_deq| <= sum over blocks of max|a_block| / 254 * sum_k |W_deq[k, n]|."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    k, n = 70, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 5, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 5, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    quantized = quantize_weights(model, bits=4, block_size=32, accuracy_level=4)
    arrays = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    (node,) = [nd for nd in quantized.graph.node if nd.op_type == "MatMulNBits"]
    w_deq = dequantize_matmul_nbits(node, arrays).astype(np.float64)
    y = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = x.astype(np.float64) @ w_deq
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (0, 96 - k)))
    amax = np.abs(padded.reshape(3, 5, 3, 32)).max(-1)  # [3, 5, blocks]
    wsum = np.abs(np.pad(w_deq, ((0, 96 - k), (0, 0)))).reshape(3, 32, n).sum(1)  # [blocks, n]
    bound = (amax / 254) @ wsum + 1e-5 * np.abs(exact).max()
    assert np.all(np.abs(y - exact) <= bound)
    assert np.abs(y - exact).max() > 1e-6  # the int8 path ran (float32 compute would be ~1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied lm_head
def test_lm_head_at_its_own_width(family, exported_graph, tmp_path):
    """--weights int4 --lm-head int8: the projections are 4-bit, the lm_head alone 8-bit, and the
    graph computes what the float32 graph with those dequantized weights computes."""
    hf_model, path = exported_graph(family, kv_cache=True)
    vocab = hf_model.config.vocab_size
    record = build_deployment(
        path, tmp_path / "d", DeployOptions(weights="int4", lm_head_weights="int8", accuracy_level=0, fuse=False)
    )
    model = onnx.load(str(tmp_path / "d" / "model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    bits = {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in model.graph.node if n.op_type == "MatMulNBits"}
    head = producers["logits"]
    assert head.op_type == "MatMulNBits" and bits.pop(head.name) == 8
    assert set(bits.values()) == {4} and len(bits) == _weight_matmuls(path) - 1
    assert record["lm_head_weights"] == "int8" and record["matmul_nbits"] == _weight_matmuls(path)
    _dequantized_reference(tmp_path / "d" / "model.onnx", tmp_path / "ref.onnx")
    ids, mask = left_padded_batch(vocab)
    got, got_ids, all_mask = ort_decode_logits(tmp_path / "d" / "model.onnx", ids, mask, steps=4)
    want, want_ids, _ = ort_decode_logits(tmp_path / "ref.onnx", ids, mask, steps=4)
    assert np.array_equal(got_ids.numpy(), want_ids.numpy())
    assert max_diff_on_tokens(got, want, all_mask) <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_lm_head_weights_checked():
    with pytest.raises(PanguLightError, match="--lm-head"):
        DeployOptions(weights="fp32", lm_head_weights="int8").check()
    with pytest.raises(PanguLightError, match="--lm-head"):
        DeployOptions(weights="int4", lm_head_weights="int2").check()
    assert DeployOptions(weights="int4", quantize_lm_head=False, lm_head_weights="int8").head_weights() == "fp32"
    # defaults: int4 projections get an int8 lm_head (measured: README, deploy section), int8 its own
    assert DeployOptions(weights="int4").head_weights() == "int8"
    assert DeployOptions(weights="int8").head_weights() == "int8"
    assert DeployOptions(weights="int4", lm_head_weights="int4").head_weights() == "int4"
