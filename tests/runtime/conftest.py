"""Fixtures for the runtime tests: a word-level tokenizer for the tiny models' vocabulary of
160, a hand-built decode graph whose layers have different KV shapes, and SmolLM2's decode
graph (exported once per session, real_model tests only).

The tiny graphs themselves come from ``exported_graph`` in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

TINY_VOCAB = 160

# Hand-built graph: layer i's cache has HETERO_KV[i] = (kv_heads, head_dim).
HETERO_KV = ((2, 4), (3, 8), (1, 2))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer: "<pad>" 0, "<s>" 1, "</s>" 2, then "w3" ... "w159"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, TINY_VOCAB)})
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save_pretrained(str(directory))
    return directory


def with_metadata(source: Path, target: Path, **props: str) -> Path:
    """Copy the graph at ``source`` to ``target`` with extra metadata_props."""
    model = onnx.load(str(source))
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
    onnx.save(model, str(target))
    return target


def build_hetero_decode_graph(path: Path, vocab: int = 50) -> Path:
    """A toy decode graph with the real I/O contract and per-layer KV shapes HETERO_KV.

    Every layer's present = Concat(past, new), where new broadcasts the (float) token ids over
    [B, kv_i, S, d_i]; so the last layer's present summed over heads, positions and dims is
    kv * d * (sum of all token ids fed so far). The logits peak at that sum mod ``vocab``:
    the next token is (sum of every token so far) % vocab, which holds only if each step's past
    really is the previous step's present with the graph's own shapes.
    """
    nodes, inits = [], []
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    nodes.append(helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT))
    inits.append(helper.make_tensor("axes_1_3", TensorProto.INT64, [2], [1, 3]))
    nodes.append(helper.make_node("Unsqueeze", ["ids_f", "axes_1_3"], ["ids_4d"]))  # [B, 1, S, 1]
    for layer, (kv, dim) in enumerate(HETERO_KV):
        inits.append(helper.make_tensor(f"shape_{layer}", TensorProto.INT64, [4], [1, kv, 1, dim]))
        nodes.append(helper.make_node("Expand", ["ids_4d", f"shape_{layer}"], [f"new_{layer}"]))
        for kind in ("key", "value"):
            past, present = f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch", kv, "past_sequence", dim]))
            outputs.append(
                helper.make_tensor_value_info(
                    present, TensorProto.FLOAT, ["batch", kv, "past_sequence + sequence", dim]
                )
            )
            nodes.append(helper.make_node("Concat", [past, f"new_{layer}"], [present], axis=2))
    last = len(HETERO_KV) - 1
    kv, dim = HETERO_KV[last]
    inits += [
        helper.make_tensor("axes_sum", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("per_token", TensorProto.FLOAT, [], [float(kv * dim)]),
        helper.make_tensor("vocab_f", TensorProto.FLOAT, [], [float(vocab)]),
        helper.make_tensor("vocab_range", TensorProto.FLOAT, [vocab], np.arange(vocab, dtype=np.float32).tolist()),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("axes_2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("axes_1_2", TensorProto.INT64, [2], [1, 2]),
    ]
    nodes += [
        helper.make_node("ReduceSum", [f"present.{last}.key", "axes_sum"], ["total"], keepdims=1),  # [B,1,1,1]
        helper.make_node("Div", ["total", "per_token"], ["token_sum"]),
        helper.make_node("Squeeze", ["token_sum", "axes_sum"], ["token_sum_b"]),  # [B]
        helper.make_node("Mod", ["token_sum_b", "vocab_f"], ["target"], fmod=1),
        helper.make_node("Unsqueeze", ["target", "axes_1_2"], ["target_3d"]),  # [B, 1, 1]
        # logits = -(range - target)^2 + 0 * ids: shape [B, S, V], peak at target
        helper.make_node("Sub", ["vocab_range", "target_3d"], ["diff"]),  # [B, 1, V]
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("Neg", ["sq"], ["peak"]),
        helper.make_node("Mul", ["ids_f", "zero"], ["zeros_bs"]),
        helper.make_node("Unsqueeze", ["zeros_bs", "axes_2"], ["zeros_bs1"]),  # [B, S, 1]
        helper.make_node("Add", ["peak", "zeros_bs1"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "hetero_kv_decode", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    entry = model.metadata_props.add()
    entry.key, entry.value = "pangu_light.graph_kind", "decode"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def hetero_graph(tmp_path_factory) -> tuple[Path, tuple[tuple[int, int], ...]]:
    """(path, per-layer (kv_heads, head_dim)) of the hand-built decode graph."""
    return build_hetero_decode_graph(tmp_path_factory.mktemp("hetero") / "hetero.onnx"), HETERO_KV


@pytest.fixture(scope="session")
def add_metadata():
    """``add_metadata(source, target, **props)``: copy a graph with extra metadata_props."""
    return with_metadata


@pytest.fixture(scope="session")
def smollm2_decode(smollm2_model, smollm2_graph):
    """(hf_model, decode graph path) for SmolLM2-135M, exported once (shared graph cache)."""
    return smollm2_model, smollm2_graph(kv_cache=True)
