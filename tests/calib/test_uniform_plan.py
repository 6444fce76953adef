"""A --uniform plan compiles to a graph whose shapes are a standard Hugging Face config: a model
built from that config with the graph's weights computes the graph's logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers

from pangu_light.calib.planner import Targets, make_plan
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline

from reference import left_padded_batch, ort_logits, torch_logits

sys.path.insert(0, str(Path(__file__).parent))
from test_planner import fake_stats  # noqa: E402


# Gemma scales embeddings by sqrt(config.hidden_size): after slicing, the graph keeps the
# original constant, which no standard config can express. GLM4's fused gate_up is standard.
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "glm4"])
def test_uniform_plan_is_a_standard_config(exported_graph, family, tmp_path):
    _, path = exported_graph(family)
    model = ir.load(path)
    model_map = ModelMap.from_model(model)
    plan = make_plan(model_map, fake_stats(model_map, seed=5), Targets(params=0.6, drop_layers=1, uniform=True))
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    out = tmp_path / "pruned.onnx"
    ir.save(model, out)

    pruned = ModelMap.from_model(model)
    shapes = {(l.attention.num_heads, l.attention.num_kv_heads, l.ffn.intermediate_size) for l in pruned.layers}
    assert len(shapes) == 1, f"a uniform plan gave per-layer shapes {shapes}"
    ((heads, kv_heads, ffn),) = shapes
    config_dict = json.loads(model.metadata_props["pangu_light.source_config"])
    config_dict.update(
        hidden_size=pruned.hidden_size, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=ffn, num_hidden_layers=len(pruned.layers),
        head_dim=pruned.layers[0].attention.head_dim,
    )
    config_dict.pop("layer_types", None)
    config = transformers.AutoConfig.for_model(**config_dict)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    weights = {name: torch.from_numpy(v.const_value.numpy().copy()) for name, v in model.graph.initializers.items()
               if v.const_value is not None}
    state = hf_model.state_dict()
    loaded = {name: weights[name] for name in state if name in weights}
    if "model.embed_tokens.weight" not in loaded:  # tied: the graph names the one tensor lm_head.weight
        loaded["model.embed_tokens.weight"] = weights["lm_head.weight"]
    missing = [name for name in state if name not in loaded and not name.endswith("rotary_emb.inv_freq")]
    assert not missing, f"no graph weight for {missing[:5]}"
    hf_model.load_state_dict(loaded, strict=False)

    ids, mask = left_padded_batch(model_map.vocab_size)
    expected = torch_logits(hf_model, ids, mask)
    got = ort_logits(out, ids, mask)
    assert np.abs(got - expected)[mask.numpy().astype(bool)].max() <= 1e-5
