"""The exported graphs compute what the torch models compute, and keep the structure passes need.

Function: ONNX Runtime (graph optimisations off, so we test our graph and not ORT's rewrite
of it) against the Hugging Face model in torch, float32, on a left-padded batch; the decode
graph by prefill (zero-length past) plus greedy decode steps that feed ``present`` back as
``past``, against one torch forward over the whole sequence.

Tolerances come from the numbers: tiny models agree to about 1e-7 (bound 1e-5); SmolLM2-135M
(30 layers, logits of magnitude ~20) to about 1e-4 on one machine and a few 1e-4 on another, so
it is held to ``float32_bound`` (tests/reference.py: 2e-4 + 3e-5 x max |logit|), and ORT's greedy
choices to torch's argmax up to near-ties within that bound.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.export import ExportOptions, check_supported, export_model
from pangu_light.passes.analysis.model_map import ModelMap

from reference import assert_greedy_agrees, float32_bound

TINY_TOL = 1e-5
DECODE_STEPS = 4


# ----------------------------------------------------------------------------- helpers
def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Token ids in [3, vocab) and a mask with zeros at the start of the shorter rows."""
    rng = np.random.default_rng(seed)
    seq = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), seq), dtype=np.int64)
    mask = np.zeros((len(lengths), seq), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, seq - n:] = 1
        ids[row, : seq - n] = 0  # the pad id
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference: HF forward with positions counted over real tokens only."""
    mask_t = torch.from_numpy(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids), attention_mask=mask_t, position_ids=positions, use_cache=False
        )
    return out.logits.float().numpy()


def run_no_cache(path, ids, mask) -> np.ndarray:
    return session(path).run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def run_decode(path, config, ids, mask, steps: int):
    """Prefill with a zero-length past, then ``steps`` greedy steps feeding present back as past.

    Returns (the full token sequence, its mask, the logits of every position concatenated).
    """
    sess = session(path)
    num_kv = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch = ids.shape[0]
    past = {
        f"past_key_values.{i}.{kind}": np.zeros((batch, num_kv, 0, head_dim), dtype=np.float32)
        for i in range(config.num_hidden_layers)
        for kind in ("key", "value")
    }
    output_names = [o.name for o in sess.get_outputs()]
    all_ids, all_mask, logits_parts = ids, mask, []
    step_ids = ids
    for step in range(steps + 1):
        outputs = dict(zip(output_names, sess.run(None, {"input_ids": step_ids, "attention_mask": all_mask, **past})))
        logits_parts.append(outputs["logits"])
        past = {
            f"past_key_values.{i}.{kind}": outputs[f"present.{i}.{kind}"]
            for i in range(config.num_hidden_layers)
            for kind in ("key", "value")
        }
        if step == steps:
            break
        step_ids = outputs["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        all_ids = np.concatenate([all_ids, step_ids], axis=1)
        all_mask = np.concatenate([all_mask, np.ones_like(step_ids)], axis=1)
    return all_ids, all_mask, np.concatenate(logits_parts, axis=1)


def max_diff_on_real_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    real = mask.astype(bool)
    return float(np.abs(a[real] - b[real]).max())


# ----------------------------------------------------------------------------- tiny models
def test_no_cache_matches_torch(exported_graph, family):
    model, path = exported_graph(family, kv_cache=False)
    ids, mask = left_padded_batch(model.config.vocab_size, [12, 9, 5], seed=1)
    onnx_logits = run_no_cache(path, ids, mask)
    reference = torch_logits(model, ids, mask)
    diff = max_diff_on_real_tokens(onnx_logits, reference, mask)
    print(f"{family} no-cache max |ORT - torch| = {diff:.2e}")
    assert diff <= TINY_TOL
    # The check can fail: the logits are not flat, and differ between the rows.
    assert np.abs(reference[mask.astype(bool)]).max() > 100 * TINY_TOL


def test_decode_matches_torch(exported_graph, family):
    model, path = exported_graph(family, kv_cache=True)
    ids, mask = left_padded_batch(model.config.vocab_size, [7, 4, 6], seed=2)
    all_ids, all_mask, onnx_logits = run_decode(path, model.config, ids, mask, DECODE_STEPS)
    assert onnx_logits.shape[1] == ids.shape[1] + DECODE_STEPS
    reference = torch_logits(model, all_ids, all_mask)
    diff = max_diff_on_real_tokens(onnx_logits, reference, all_mask)
    print(f"{family} decode max |ORT - torch| = {diff:.2e}")
    assert diff <= TINY_TOL


# ----------------------------------------------------------------------------- structure
def _is_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "decode"])
def test_weights_keep_state_dict_names(exported_graph, family, kv_cache):
    """Every weight of a Linear, Embedding or RMSNorm is an initializer under its state_dict
    name, with the same shape and values. A tied embedding is stored once, under one of its
    two names (torch.export picks ``lm_head.weight``)."""
    model, path = exported_graph(family, kv_cache=kv_cache)
    graph = ir.load(path).graph
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, (torch.nn.Linear, torch.nn.Embedding)) or _is_norm(owner):
            aliases.setdefault(id(tensor), []).append(name)
    checked = 0
    for names in aliases.values():
        present = [n for n in names if n in graph.initializers]
        assert len(present) == 1, f"{family}: expected one initializer named one of {names}, found {present}"
        value = graph.initializers[present[0]].const_value.numpy()
        param = model.get_parameter(names[0]).detach().numpy()
        assert value.shape == param.shape, names
        np.testing.assert_array_equal(value, param, err_msg=present[0])
        checked += 1
    tied = model.config.tie_word_embeddings
    assert (["model.embed_tokens.weight", "lm_head.weight"] in aliases.values()) == tied
    per_layer = 7 + 2 + (2 if family in ("qwen3", "gemma3") else 0)
    per_layer += 2 if family in ("gemma2", "gemma3", "glm4") else 0
    per_layer -= 1 if family == "glm4" else 0  # one fused gate_up_proj
    per_layer += sum(1 for n in aliases.values() if n[0].startswith("model.layers.0.") and n[0].endswith(".bias"))
    assert checked == model.config.num_hidden_layers * per_layer + 2 + (0 if tied else 1)


@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-cache", "decode"])
def test_layers_have_their_own_head_count_constants(exported_graph, family, kv_cache):
    model, path = exported_graph(family, kv_cache=kv_cache)
    model_map = ModelMap.from_model(ir.load(path))
    config = model.config
    expected = {
        "kv_heads": config.num_key_value_heads,
        "heads_per_group": config.num_attention_heads // config.num_key_value_heads,
        "heads": config.num_attention_heads,
    }
    owner: dict[int, int] = {}
    for layer in model_map.layers:
        constants = layer.attention.head_count_constants
        assert {c.what for c in constants} == set(expected), f"layer {layer.index}"
        for c in constants:
            assert int(c.value.const_value.numpy().reshape(-1)[0]) == expected[c.what]
            previous = owner.setdefault(id(c.value), layer.index)
            assert previous == layer.index, f"layers {previous} and {layer.index} share the constant {c.value.name}"


def _dims(value: ir.Value) -> list:
    return [d if isinstance(d, int) else d.value for d in value.shape]


def test_io_names_and_dynamic_dims_no_cache(exported_graph, family):
    model, path = exported_graph(family, kv_cache=False)
    graph = ir.load(path).graph
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask"]
    assert [v.name for v in graph.outputs] == ["logits"]
    ids, mask = (_dims(v) for v in graph.inputs)
    logits = _dims(graph.outputs[0])
    assert all(isinstance(d, str) for d in ids + mask), (ids, mask)
    assert ids == mask  # same batch and sequence symbols
    assert logits == ids + [model.config.vocab_size]
    assert graph.inputs[0].dtype == ir.DataType.INT64
    assert graph.outputs[0].dtype == ir.DataType.FLOAT


def test_io_names_and_dynamic_dims_decode(exported_graph, family):
    model, path = exported_graph(family, kv_cache=True)
    graph = ir.load(path).graph
    config = model.config
    layers = range(config.num_hidden_layers)
    past = [f"past_key_values.{i}.{k}" for i in layers for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in layers for k in ("key", "value")]
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask", *past]
    assert [v.name for v in graph.outputs] == ["logits", *present]
    batch, sequence = _dims(graph.inputs[0])
    mask_batch, total = _dims(graph.inputs[1])
    assert all(isinstance(d, str) for d in (batch, sequence, total)) and mask_batch == batch
    assert total != sequence
    assert _dims(graph.outputs[0]) == [batch, sequence, config.vocab_size]
    past_dims = [_dims(v) for v in graph.inputs[2:]]
    present_dims = [_dims(v) for v in graph.outputs[1:]]
    for dims in past_dims + present_dims:
        assert dims[0] == batch and dims[1] == config.num_key_value_heads and dims[3] == config.head_dim
        assert isinstance(dims[2], str)
    assert {d[2] for d in past_dims} != {d[2] for d in present_dims}  # present grows by the query


@pytest.mark.parametrize(
    "config",
    [
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0),
        transformers.BertConfig(
            num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50
        ),
    ],
    ids=["gpt2", "bert"],
)
def test_unsupported_architecture_names_supported_families(config):
    with pytest.raises(PanguLightError) as error:
        check_supported(config)
    message = str(error.value)
    assert config.model_type in message
    for family in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "glm4"):
        assert family in message


def test_export_refuses_unsupported_model_before_tracing():
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(PanguLightError, match="not supported; supported decoder-only families: gemma2"):
        export_model(model, ExportOptions(kv_cache=False))


# ----------------------------------------------------------------------------- SmolLM2-135M
PROMPTS = [
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris.",
    "Photosynthesis converts light energy into chemical energy.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_model, smollm2_dir):
    from pangu_light.frontend.loading import load_tokenizer

    return smollm2_model, load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_export(smollm2_graph):
    return smollm2_graph


def _smollm2_batch(tokenizer):
    rows = [tokenizer(p)["input_ids"][:24] for p in PROMPTS]
    seq = max(len(r) for r in rows)
    ids = np.zeros((len(rows), seq), dtype=np.int64)
    mask = np.zeros((len(rows), seq), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, seq - len(row) :] = row
        mask[i, seq - len(row) :] = 1
    assert 15 <= seq <= 24 and mask.sum(1).min() < seq  # left padding really happens
    return ids, mask


@pytest.mark.real_model
def test_smollm2_no_cache_matches_torch(smollm2, smollm2_export):
    model, tokenizer = smollm2
    ids, mask = _smollm2_batch(tokenizer)
    onnx_logits = run_no_cache(smollm2_export(False), ids, mask)
    reference = torch_logits(model, ids, mask)
    diff = max_diff_on_real_tokens(onnx_logits, reference, mask)
    print(f"smollm2 no-cache max |ORT - torch| = {diff:.2e} (max |logit| {np.abs(reference).max():.1f})")
    assert diff <= float32_bound(reference, mask=mask)


@pytest.mark.real_model
def test_smollm2_decode_matches_torch(smollm2, smollm2_export):
    model, tokenizer = smollm2
    ids, mask = _smollm2_batch(tokenizer)
    all_ids, all_mask, onnx_logits = run_decode(smollm2_export(True), model.config, ids, mask, DECODE_STEPS)
    reference = torch_logits(model, all_ids, all_mask)
    diff = max_diff_on_real_tokens(onnx_logits, reference, all_mask)
    print(f"smollm2 decode max |ORT - torch| = {diff:.2e}")
    bound = float32_bound(reference, mask=all_mask)
    assert diff <= bound
    # Greedy decoding under ORT picked the tokens torch would pick from the same prefix.
    assert_greedy_agrees(all_ids[:, ids.shape[1] :], reference[:, ids.shape[1] - 1 : -1], bound)
