"""random:<arch>: seeded random weights of a real architecture's shape, generated while saving;
the graphs compute what the same Hugging Face model with those weights computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.export_stage import export_graphs
from pangu_light.frontend.loading import load_hf_model, load_tokenizer, resolve_model
from pangu_light.frontend.random_models import ARCHITECTURES
from pangu_light.passes.infra.graph_io import load_model

from reference import decode_diff, no_cache_diff


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PANGU_LIGHT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(path) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy() for n, v in load_model(path).graph.initializers.items()}


def _hf_with(graph_weights: dict[str, np.ndarray], model_dir) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {name: torch.from_numpy(graph_weights[name].copy()) for name in model.state_dict() if name in graph_weights}
    if "model.embed_tokens.weight" not in state:  # tied: one tensor, named lm_head.weight in the graph
        state["model.embed_tokens.weight"] = torch.from_numpy(graph_weights["lm_head.weight"].copy())
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.endswith("inv_freq") or k == "lm_head.weight" for k in missing), missing
    return model


def test_random_tiny_model_exports_and_matches_torch(cache, tmp_path):
    outputs = {False: tmp_path / "m.onnx", True: tmp_path / "d.onnx"}
    export_graphs("random:llama-tiny", outputs)
    model_dir = resolve_model("random:llama-tiny")
    weights = _weights(outputs[False])
    decode_weights = _weights(outputs[True])
    parameters = [k for k in weights if k.endswith("weight")]
    assert all(np.array_equal(weights[k], decode_weights[k]) for k in parameters)
    projection = weights["model.layers.0.mlp.down_proj.weight"]
    assert projection.shape == (64, 128) and 0.015 < projection.std() < 0.025
    norm = weights["model.layers.1.input_layernorm.weight"]
    assert abs(norm.mean() - 1) < 0.03 and norm.std() > 0.01
    reference = _hf_with(weights, model_dir)
    assert no_cache_diff(outputs[False], reference) <= 1e-5
    assert decode_diff(outputs[True], reference) <= 1e-5
    with pytest.raises(PanguLightError, match="random:ARCH model"):
        load_hf_model(model_dir)


def test_random_weights_are_seeded_per_tensor(cache, tmp_path):
    export_graphs("random:llama-tiny", {False: tmp_path / "a.onnx"})
    export_graphs("random:llama-tiny", {False: tmp_path / "b.onnx"})
    export_graphs("random:llama-tiny@1", {False: tmp_path / "c.onnx"})
    a, b, c = (_weights(tmp_path / f"{x}.onnx") for x in "abc")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a[name], c[name])
    assert not np.array_equal(a[name], a["model.layers.1.self_attn.q_proj.weight"])


def test_byte_level_tokenizer_round_trips_and_fits_every_vocabulary(cache):
    tokenizer = load_tokenizer(resolve_model("random:llama-tiny"))
    text = "Pruning großer Modelle, 2025 — ok."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 258
    assert tokenizer.decode(ids) == text
    assert min(spec["vocab_size"] for spec in ARCHITECTURES.values()) >= 258


def test_unknown_random_architecture_names_the_known_ones(cache):
    with pytest.raises(PanguLightError, match="random:llama-1.1b"):
        resolve_model("random:gpt-5")
