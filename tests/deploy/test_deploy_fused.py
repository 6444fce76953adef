"""Fused fp32 deployment graphs (fuse-gqa, fuse-norms): the fusions fired (op counts, so a
pattern regression fails here) and the graph computes what the unfused decode graph computes,
on every family, uniform and per-layer pruned shapes: batch 3 left-padded (9, 6, 4 tokens),
prefill then 5 greedy steps, fed both ways (past of P positions in, present of P + S out; and
one shared buffer of fixed capacity bound as past and present, as the runtime does), and through
``generate`` (shared-buffer loop == numpy loop). Gemma2/3's sliding windows (4) are shorter than
the sequences, so an off-by-one window fails. int8/int4 on top of the fused graph compute what
the fused fp32 graph with the dequantized weights computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_quantize import _dequantized_reference

from pangu_light.core.errors import PanguLightError
from pangu_light.deploy.build import DEPLOY_KEY, DeployOptions, build_deployment
from pangu_light.passes.deploy.fuse_gqa import IO_KIND_GQA
from pangu_light.runtime import layout as runtime_layout
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.generate import generate
from pangu_light.runtime.kv_runners import SharedRunner
from pangu_light.runtime.layout import DecodeLayout
from pangu_light.runtime.sampling import Sampling

from reference import compile_graph, left_padded_batch, max_diff_on_tokens, ort_decode_logits, session

# Per-layer shapes: KV groups 2, 1, 2, 1 (heads 4, 2, 4, 2), FFN 40, layer 2 dropped.
PER_LAYER = "prune-kv-groups{keep=[[0,1],[1],[0,1],[0]]},prune-ffn{keep_first=40},drop-layers{layers=[2]}"
# RMSNorms per layer: pre-attn + pre-ffn, sandwich families 4, q/k norms 2 more.
NORMS_PER_LAYER = {"llama": 2, "qwen2": 2, "mistral": 2, "qwen3": 4, "gemma2": 4, "gemma3": 6, "glm4": 4}
# GLM4's rotary is partial and interleaved, applied through a reshuffle of the table: not fused.
NO_GQA = {"glm4"}
# q/k norms sit between the projections and GQA: q, k, v stay three MatMuls.
NOT_PACKED = {"qwen3", "gemma3"}
STEPS = 5


def _graph(exported_graph, family, shape, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    layers = 4
    if shape == "per-layer":
        compile_graph(path, PER_LAYER, tmp_path / "p.onnx")
        path, layers = tmp_path / "p.onnx", 3
    return hf_model.config.vocab_size, path, layers


def _named_unused_norm_outputs(path) -> list[str]:
    """Outputs after the first of the fused norms that have a name but no reader."""
    graph = onnx.load(str(path), load_external_data=False).graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    return [name for node in graph.node if node.op_type.endswith("SimplifiedLayerNormalization")
            for name in node.output[1:] if name and name not in read]


def _shared_buffer_logits(path, all_ids, all_mask, prompt: int) -> np.ndarray:
    """Prefill and steps along the given tokens with one buffer per cache tensor bound as both
    past and present (``SharedRunner``); logits [b, total, V]."""
    sess = session(path)
    layout = DecodeLayout.from_session(sess)
    assert layout.shared_buffer
    ids, mask = all_ids.numpy(), all_mask.numpy()
    runner = SharedRunner(sess, layout, "cpu", 0, ids.shape[0], ids.shape[1])
    chunks = [runner.run(ids[:, :prompt], mask[:, :prompt]).copy()]
    for t in range(prompt, ids.shape[1]):
        chunks.append(runner.run(ids[:, t : t + 1], mask[:, : t + 1]).copy())
    return np.concatenate(chunks, 1)


@pytest.mark.parametrize("shape", ["uniform", "per-layer"])
def test_fused_fp32_equals_unfused_graph(exported_graph, family, shape, tmp_path):
    vocab, path, layers = _graph(exported_graph, family, shape, tmp_path)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights="fp32", max_length=64))
    deployed = tmp_path / "d" / "model.onnx"
    ops = record["ops_after"]
    fused = family not in NO_GQA
    assert ops.get("GroupQueryAttention", 0) == (layers if fused else 0)
    assert ops.get("SkipSimplifiedLayerNormalization", 0) == 2 * layers
    norms = ops.get("SimplifiedLayerNormalization", 0) + ops["SkipSimplifiedLayerNormalization"]
    assert norms == NORMS_PER_LAYER[family] * layers + 1 and "Reciprocal" not in ops
    # mean and 1/std of each Skip norm are not computed for nothing
    assert record["fuse_norms"]["unused_outputs_dropped"] >= 2 * ops["SkipSimplifiedLayerNormalization"]
    assert _named_unused_norm_outputs(tmp_path / "d" / "model.onnx") == []
    if fused:
        assert "Softmax" not in ops
        packed = 0 if family in NOT_PACKED else layers
        assert record["pack_qkv"].get("packed", 0) == packed
        # per layer: o, gate, up, down and q, k, v (or one packed qkv); plus the lm_head
        assert ops["MatMul"] == layers * (4 + (1 if packed else 3)) + 1
        assert record["io_kind"] == IO_KIND_GQA and record["nodes_after"] < record["nodes_before"] / 3

    ids, mask = left_padded_batch(vocab)
    want, want_ids, all_mask = ort_decode_logits(path, ids, mask, steps=STEPS)
    got, got_ids, _ = ort_decode_logits(deployed, ids, mask, steps=STEPS)
    bound = 1e-4 * max(1.0, float(np.abs(want).max()))  # 1e-4 relative: float32 reassociation
    assert max_diff_on_tokens(got, want, all_mask) <= bound
    assert np.array_equal(got_ids.numpy(), want_ids.numpy())
    if fused:
        shared = _shared_buffer_logits(deployed, want_ids, all_mask, ids.shape[1])
        assert max_diff_on_tokens(shared, want, all_mask) <= bound


def test_generate_shared_buffer_loop_equals_numpy_loop(exported_graph, tmp_path):
    vocab, path, _ = _graph(exported_graph, "gemma2", "per-layer", tmp_path)
    build_deployment(path, tmp_path / "d", DeployOptions(weights="fp32", max_length=64))
    info = session(tmp_path / "d" / "model.onnx")
    assert DecodeLayout.from_session(info).shared_buffer
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35]]
    for select in (None, Sampling(temperature=0.8, top_k=20, seed=3)):
        kwargs = {} if select is None else {"select": select}
        bound = generate(info, prompts, 8, **kwargs).tokens
        plain = generate(info, prompts, 8, io_binding=False, **kwargs).tokens
        assert bound == plain and all(len(t) == 8 for t in bound)
    reference = generate(session(path), prompts, 8).tokens
    assert generate(info, prompts, 8).tokens == reference


def test_generate_refuses_more_positions_than_the_rotary_cache(exported_graph, tmp_path):
    _, path, _ = _graph(exported_graph, "llama", "uniform", tmp_path)
    build_deployment(path, tmp_path / "d", DeployOptions(weights="fp32", max_length=16))
    with pytest.raises(RuntimeUserError, match="--max-length"):
        generate(session(tmp_path / "d" / "model.onnx"), [[5] * 10], 8)


def test_runtime_reads_the_deploy_record_under_the_same_names():
    assert runtime_layout.DEPLOY_METADATA_KEY == DEPLOY_KEY
    assert runtime_layout.SHARED_BUFFER_IO == IO_KIND_GQA


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_quantized_fused_graph_equals_dequantized_fused_fp32(exported_graph, weights, tmp_path):
    vocab, path, layers = _graph(exported_graph, "qwen3", "per-layer", tmp_path)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights=weights, accuracy_level=0, max_length=64))
    assert record["ops_after"]["GroupQueryAttention"] == layers and record["io_kind"] == IO_KIND_GQA
    assert record["matmul_nbits"] == 7 * layers + 1  # every projection and the tied lm_head
    deployed = tmp_path / "d" / "model.onnx"
    _dequantized_reference(deployed, tmp_path / "ref.onnx")
    ids, mask = left_padded_batch(vocab)
    got, got_ids, all_mask = ort_decode_logits(deployed, ids, mask, steps=STEPS)
    want, want_ids, _ = ort_decode_logits(tmp_path / "ref.onnx", ids, mask, steps=STEPS)
    # Same weights, float32 compute in both: only the summation order differs (K <= 96 terms).
    bound = 1e-5 * max(1.0, float(np.abs(want).max()))
    assert np.array_equal(got_ids.numpy(), want_ids.numpy())
    assert max_diff_on_tokens(got, want, all_mask) <= bound
    shared = _shared_buffer_logits(deployed, want_ids, all_mask, ids.shape[1])
    assert max_diff_on_tokens(shared, want, all_mask) <= bound


@pytest.mark.parametrize("family,shape", [("llama", "uniform"), ("gemma2", "per-layer")])
def test_no_padding_bias_equals_unfused_graph_on_unpadded_batches(exported_graph, family, shape, tmp_path):
    """--no-padding-bias: GQA reads no attention_bias (nor is one built); on a batch without
    padding (3 prompts of 7 tokens) the graph computes what the unfused one does, prefill and 5
    steps, fed both ways; the runtime refuses prompts of different lengths for it."""
    vocab, path, layers = _graph(exported_graph, family, shape, tmp_path)
    record = build_deployment(path, tmp_path / "d", DeployOptions(weights="fp32", max_length=64, padding_bias=False))
    deployed = tmp_path / "d" / "model.onnx"
    assert record["padding_bias"] is False and record["ops_after"]["GroupQueryAttention"] == layers
    with_bias = build_deployment(path, tmp_path / "b", DeployOptions(weights="fp32", max_length=64))
    assert record["nodes_after"] < with_bias["nodes_after"] and "Concat" not in record["ops_after"]
    graph = onnx.load(str(deployed), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all(len(n.input) < 11 or not n.input[10] for n in gqa)  # no attention_bias
    ids, mask = left_padded_batch(vocab, lengths=(7, 7, 7))
    want, want_ids, all_mask = ort_decode_logits(path, ids, mask, steps=STEPS)
    got, got_ids, _ = ort_decode_logits(deployed, ids, mask, steps=STEPS)
    bound = 1e-4 * max(1.0, float(np.abs(want).max()))
    assert max_diff_on_tokens(got, want, all_mask) <= bound
    assert np.array_equal(got_ids.numpy(), want_ids.numpy())
    shared = _shared_buffer_logits(deployed, want_ids, all_mask, ids.shape[1])
    assert max_diff_on_tokens(shared, want, all_mask) <= bound
    info = session(deployed)
    assert not DecodeLayout.from_session(info).padding_bias
    prompts = ids.numpy().tolist()
    assert generate(info, prompts, 6).tokens == generate(session(path), prompts, 6).tokens
    with pytest.raises(RuntimeUserError, match="--no-padding-bias"):
        generate(info, [[5, 6, 7], [8, 9]], 4)
    # ...and the check can fail: on a left-padded batch the bias-less graph differs from the export
    ids, mask = left_padded_batch(vocab)
    want, _, all_mask = ort_decode_logits(path, ids, mask, steps=1)
    got, _, _ = ort_decode_logits(deployed, ids, mask, steps=1)
    assert max_diff_on_tokens(got, want, all_mask) > 100 * bound


def test_no_padding_bias_needs_the_fused_graph():
    with pytest.raises(PanguLightError, match="--no-padding-bias"):
        DeployOptions(fuse=False, padding_bias=False).check()
