"""set-projection: the graph with projections replaced from a file equals the same replacement
done on the PyTorch module (weights, a bias added, an existing bias replaced), and bad files are
refused with one clear line before anything changes."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.rewrites.set_projection import SetProjectionPass, save_projections

from reference import compile_graph, decode_diff, graph_bytes, no_cache_diff
from reference_width import torch_prune_heads

TOLERANCE = 1e-5

# (module path in the HF model, initializer name, new shape [out, in], with a bias)
EDITS = {
    "llama": [
        ("model.layers.0.self_attn.o_proj", (64, 64), True),
        ("model.layers.2.mlp.down_proj", (64, 96), False),
        ("model.layers.3.mlp.down_proj", (64, 96), True),
    ],
    "qwen2": [
        ("model.layers.1.self_attn.q_proj", (64, 64), True),  # replaces q_proj's own bias
        ("model.layers.3.self_attn.o_proj", (64, 64), True),
        ("lm_head", (160, 64), False),  # untied in the tiny qwen2
    ],
}


def new_values(edits, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        f"{module}.weight": (
            rng.normal(0.0, 0.1, shape).astype(np.float32),
            rng.normal(0.0, 0.1, shape[0]).astype(np.float32) if bias else None,
        )
        for module, shape, bias in edits
    }


def torch_set_projections(model, projections):
    """The same replacement on a copy of the torch module (nn.Linear gains a bias where it had none)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, (weight, bias) in projections.items():
            linear = model.get_submodule(name[: -len(".weight")])
            linear.weight = torch.nn.Parameter(torch.from_numpy(weight.copy()))
            if bias is not None:
                linear.bias = torch.nn.Parameter(torch.from_numpy(bias.copy()))
    return model


def set_projection(path, projections, file, out, before: str | None = None):
    save_projections(file, projections)
    model = ir.load(path) if before is None else compile_graph(path, before, out)[0]
    result = SetProjectionPass({"file": str(file)})(model)
    ir.save(model, out)
    return result, model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_cache", [False, True])
def test_matches_the_same_replacement_in_torch(exported_graph, family, kv_cache, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=kv_cache)
    projections = new_values(EDITS[family])
    pass_ = SetProjectionPass({"file": str(tmp_path / "p.npz")})
    save_projections(tmp_path / "p.npz", projections)
    model = ir.load(path)
    assert pass_(model).modified
    ir.save(model, tmp_path / "out.onnx")
    biases = sum(bias is not None for _, bias in projections.values())
    assert pass_.stats == {"weights_set": 3, "biases_set": biases}
    reference = torch_set_projections(hf_model, projections)
    diff = decode_diff if kv_cache else no_cache_diff
    assert diff(tmp_path / "out.onnx", reference) <= TOLERANCE
    assert diff(tmp_path / "out.onnx", hf_model) > 1e-3
    layer = ModelMap.from_model(model).layers[3]
    assert layer.attention.o.bias is not None if family == "qwen2" else layer.ffn.down.bias is not None
    added = layer.attention.o if family == "qwen2" else layer.ffn.down
    assert added.bias.name == added.weight.name.replace(".weight", ".bias")
    assert added.bias.metadata_props["pangu_light.pass"] == "set-projection"


def test_after_pruning_heads(exported_graph, tmp_path):
    hf_model, path = exported_graph("llama")
    projections = new_values([("model.layers.1.self_attn.o_proj", (64, 32), True)])
    _, model = set_projection(path, projections, tmp_path / "p.npz", tmp_path / "out.onnx", "prune-heads{per_group=1}")
    reference = torch_set_projections(torch_prune_heads(hf_model, [[0, 2]] * 4), projections)
    assert no_cache_diff(tmp_path / "out.onnx", reference) <= TOLERANCE


def test_an_empty_file_changes_nothing(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    result, model = set_projection(path, {}, tmp_path / "p.npz", tmp_path / "out.onnx")
    assert not result.modified and graph_bytes(model) == graph_bytes(ir.load(path))


@pytest.mark.parametrize(
    "name, weight_shape, bias_shape, message",
    [
        ("model.layers.0.self_attn.o_proj.weight", (64, 32), None,
         "model.layers.0.self_attn.o_proj.weight: the file gives shape [64, 32], the graph has [64, 64]"),
        ("model.layers.0.self_attn.o_proj.weight", (64, 64), (32,),
         "o_proj.weight: the file's bias has shape [32], the projection has 64 outputs"),
        ("model.layers.9.self_attn.o_proj.weight", (64, 64), None,
         "model.layers.9.self_attn.o_proj.weight: the graph has no initializer of that name"),
        ("model.layers.0.input_layernorm.weight", (64,), None,
         "model.layers.0.input_layernorm.weight is not the weight of a projection"),
        ("lm_head.weight", (160, 64), None,  # tied: the embedding Gather reads it too
         "lm_head.weight is also read outside lm_head (a tied weight)"),
    ],
)
def test_bad_entries_are_clear_errors(exported_graph, tmp_path, name, weight_shape, bias_shape, message):
    _, path = exported_graph("llama")
    save_projections(tmp_path / "p.npz", {
        name: (np.zeros(weight_shape, np.float32), None if bias_shape is None else np.zeros(bias_shape, np.float32)),
    })
    model = ir.load(path)
    with pytest.raises(PanguLightError, match=re.escape(message)) as refused:
        SetProjectionPass({"file": str(tmp_path / "p.npz")})(model)
    assert str(refused.value).startswith("pass set-projection: ") and "\n" not in str(refused.value)
    assert graph_bytes(model) == graph_bytes(ir.load(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a zip file", "bad.npz is not a projection file written by pangu-light"),
        (None, "cannot read the projection file"),
    ],
)
def test_unreadable_files_are_clear_errors(exported_graph, tmp_path, content, message):
    _, path = exported_graph("llama")
    if content is not None:
        (tmp_path / "bad.npz").write_bytes(content)
    model = ir.load(path)
    with pytest.raises(PanguLightError, match=re.escape(message)) as refused:
        SetProjectionPass({"file": str(tmp_path / "bad.npz")})(model)
    assert "\n" not in str(refused.value)


def test_a_file_of_another_format_is_refused(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "pangu-light-gram/1"}'))
    with pytest.raises(PanguLightError, match="format 'pangu-light-gram/1', expected 'pangu-light-projections/1'"):
        SetProjectionPass({"file": str(tmp_path / "other.npz")})(ir.load(path))
