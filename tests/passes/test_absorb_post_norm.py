"""absorb-post-norm: the folded graph equals the model whose post-norms are x * gamma_abs."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.export import ExportOptions, export_model
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import format_value
from pangu_light.passes.infra.plan import PrunePlan

from reference import (
    compile_graph,
    decode_diff,
    graph_bytes,
    left_padded_batch,
    max_diff_on_tokens,
    no_cache_diff,
    ort_logits,
    torch_logits,
)
from reference_norm import NODES_PER_NORM, gamma_names, post_norm_names, torch_scale_post_norms, with_output_biases

TOLERANCE = 1e-5
SANDWICH = ["gemma2", "gemma3", "glm4"]
POST_ROLES = ("post_attn", "post_ffn")


def s_inv_values(count: int, seed: int = 0) -> list[float]:
    # Far from 1, so that a fold that skipped s_inv (or gamma) would be caught.
    return np.random.default_rng(seed).uniform(0.2, 3.0, count).round(6).tolist()


def absorb(s_inv: list[float]) -> str:
    return f"absorb-post-norm{{s_inv={format_value(s_inv)}}}"


def post_norm_count(model: ir.Model) -> int:
    return sum(role in layer.norms for layer in ModelMap.from_model(model).layers for role in POST_ROLES)


@pytest.mark.parametrize("family", SANDWICH)
def test_no_cache_matches_torch_scaled_norms(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    s_inv = s_inv_values(8)
    folded, report = compile_graph(path, absorb(s_inv), tmp_path / "p.onnx")
    assert report.records[0].stats["post_norms_absorbed"] == 8
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    expected = torch_logits(torch_scale_post_norms(hf_model, s_inv), ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= TOLERANCE
    # ... and the rewrite changed the function: the norms' RMS is no longer data dependent.
    assert max_diff_on_tokens(got, torch_logits(hf_model, ids, mask), mask) > 1e-3


@pytest.mark.parametrize("family", SANDWICH)
def test_decode_matches_torch_scaled_norms(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    s_inv = s_inv_values(8, seed=1)
    compile_graph(path, absorb(s_inv), tmp_path / "p.onnx")
    assert decode_diff(tmp_path / "p.onnx", torch_scale_post_norms(hf_model, s_inv)) <= TOLERANCE


@pytest.mark.parametrize("family", SANDWICH)
def test_post_norms_and_their_nodes_are_gone(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    original = ir.load(path)
    assert post_norm_count(original) == 8
    folded, report = compile_graph(path, absorb(s_inv_values(8)), tmp_path / "p.onnx")
    assert post_norm_count(folded) == 0
    model_map = ModelMap.from_model(folded)
    assert [list(layer.norms) for layer in model_map.layers] == [["pre_attn", "pre_ffn"]] * 4
    # 8 post-norms x (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul(gamma) [, Add(w, 1)])
    removed = 8 * NODES_PER_NORM[family]
    assert len(list(original.graph)) - len(list(folded.graph)) == removed
    assert report.records[0].stats["nodes_removed"] == removed
    before = collections.Counter(n.op_type for n in original.graph)
    after = collections.Counter(n.op_type for n in folded.graph)
    for op in ("Pow", "ReduceMean", "Sqrt", "Reciprocal"):
        assert before[op] - after[op] == 8
    assert before["Mul"] - after["Mul"] == 16
    assert before["Add"] - after["Add"] == (16 if NODES_PER_NORM[family] == 8 else 8)
    # The gammas are gone; each o_proj/down_proj weight was rewritten and tagged.
    assert not set(gamma_names(hf_model)) & set(folded.graph.initializers)
    for layer in model_map.layers:
        for linear in (layer.attention.o, layer.ffn.down):
            assert linear.weight.metadata_props["pangu_light.pass"] == "absorb-post-norm"
            assert linear.weight.dtype == ir.DataType.FLOAT


def test_weights_scaled_by_gamma_abs_rows(exported_graph, tmp_path):
    """The fold itself, on numbers: o_proj row k times s_inv * (1 + w_k), in float64."""
    hf_model, path = exported_graph("gemma3")
    s_inv = s_inv_values(8)
    folded, _ = compile_graph(path, absorb(s_inv), tmp_path / "p.onnx")
    layer = hf_model.model.layers[1]
    w = layer.self_attn.o_proj.weight.detach().double().numpy()
    gamma = 1.0 + layer.post_attention_layernorm.weight.detach().double().numpy()
    expected = (w * (s_inv[2] * gamma)[:, None]).astype(np.float32)
    got = folded.graph.initializers["model.layers.1.self_attn.o_proj.weight"].const_value.numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def biased_gemma3(tmp_path_factory):
    """Tiny Gemma3 with o_proj/down_proj biases, exported once for this module."""
    from families import tiny_model

    model = with_output_biases(tiny_model("gemma3"))
    path = tmp_path_factory.mktemp("biased") / "gemma3-bias.onnx"
    ir.save(export_model(model, ExportOptions()), path)
    return model, path


def test_biases_are_scaled_too(biased_gemma3, tmp_path):
    hf_model, path = biased_gemma3
    assert ModelMap.from_model(ir.load(path)).layers[0].attention.o.bias is not None
    s_inv = s_inv_values(8, seed=2)
    _, report = compile_graph(path, absorb(s_inv), tmp_path / "p.onnx")
    assert report.records[0].stats["weights_scaled"] == 16  # 8 weights + 8 biases
    assert no_cache_diff(tmp_path / "p.onnx", torch_scale_post_norms(hf_model, s_inv)) <= TOLERANCE


@pytest.mark.parametrize("family", ["gemma3", "glm4"])
def test_plan_gives_the_same_graph_as_the_list(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    s_inv = s_inv_values(8, seed=3)
    results = []
    for pipeline in (absorb(s_inv), "absorb-post-norm{plan=true}"):
        model = ir.load(path)
        plan = PrunePlan.identity(ModelMap.from_model(model))
        plan.absorb_post_norms = True
        plan.post_norm_s_inv = dict(zip(gamma_names(hf_model), s_inv))
        plan.attach(model)
        assert plan.pipeline().__str__() == "absorb-post-norm{plan=true}"
        run_pipeline(model, pipeline, verify=True)
        results.append(graph_bytes(model))
    assert results[0] == results[1]


@pytest.mark.parametrize("family", SANDWICH)
def test_kept_post_norms_stay_real_norms(exported_graph, family, tmp_path):
    """keep=[...] absorbs the other post-norms only: the graph equals the PyTorch model with just
    those replaced by constants (no-cache and decode), and the kept norms' nodes are untouched."""
    hf_model, path = exported_graph(family)
    kept_modules = frozenset(post_norm_names(hf_model)[i] for i in (1, 4, 7))
    keep = sorted(f"{name}.weight" for name in kept_modules)
    s_inv = s_inv_values(8, seed=4)
    pipeline = f"absorb-post-norm{{s_inv={format_value(s_inv)},keep={format_value(keep)}}}"
    folded, report = compile_graph(path, pipeline, tmp_path / "p.onnx")
    assert report.records[0].stats["post_norms_absorbed"] == 5
    assert report.records[0].stats["post_norms_kept"] == 3
    assert post_norm_count(folded) == 3
    assert set(keep) <= set(folded.graph.initializers)
    reference = torch_scale_post_norms(hf_model, s_inv, keep=kept_modules)
    assert no_cache_diff(tmp_path / "p.onnx", reference) <= TOLERANCE
    decode_path = exported_graph(family, kv_cache=True)[1]
    compile_graph(decode_path, pipeline, tmp_path / "d.onnx")
    assert decode_diff(tmp_path / "d.onnx", reference) <= TOLERANCE
    # ... and keeping them mattered: absorbing all 8 is a different function.
    assert no_cache_diff(tmp_path / "p.onnx", torch_scale_post_norms(hf_model, s_inv)) > 1e-3


def test_plan_keep_list_is_applied(exported_graph, tmp_path):
    hf_model, path = exported_graph("gemma3")
    model = ir.load(path)
    plan = PrunePlan.identity(ModelMap.from_model(model))
    plan.absorb_post_norms = True
    plan.post_norm_s_inv = dict(zip(gamma_names(hf_model), s_inv_values(8, seed=5)))
    plan.post_norm_keep = gamma_names(hf_model)[:2]
    plan.attach(model)
    report = run_pipeline(model, plan.pipeline(), verify=True)
    assert report.records[0].stats["post_norms_kept"] == 2
    assert PrunePlan.from_json(plan.to_json()).post_norm_keep == gamma_names(hf_model)[:2]


def test_keep_must_name_post_norms(exported_graph):
    _, path = exported_graph("gemma3")
    model = ir.load(path)
    with pytest.raises(PanguLightError, match="keep names model.norm.weight, which is not the gamma of a post-norm"):
        run_pipeline(model, f"absorb-post-norm{{s_inv={format_value(s_inv_values(8))},keep=[model.norm.weight]}}")


def test_pre_norm_model_has_nothing_to_absorb(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    model, report = compile_graph(path, absorb([0.5, 0.5]), tmp_path / "p.onnx")
    record = report.records[0]
    assert not record.modified
    assert record.stats == {"post_norms_absorbed": 0, "note": "no post-norms to absorb"}
    assert "no post-norms to absorb" in str(report)
    assert graph_bytes(model) == graph_bytes(ir.load(path))


def _share_o_proj_weight(model: ir.Model) -> str:
    """Make layer 1's o_proj read layer 0's o_proj weight (a tied weight)."""
    layers = ModelMap.from_model(model).layers
    shared = layers[0].attention.o.weight
    layers[1].attention.o.transpose.replace_input_with(0, shared)
    model.graph.initializers.pop(layers[1].attention.o.weight.name)
    return shared.name


def test_shared_weight_is_refused_and_nothing_changes(exported_graph):
    _, path = exported_graph("gemma3")
    model = ir.load(path)
    name = _share_o_proj_weight(model)
    before = graph_bytes(model)
    with pytest.raises(PanguLightError) as info:
        run_pipeline(model, absorb(s_inv_values(8)))
    message = str(info.value)
    assert f"the weight {name} is also read by Transpose" in message
    assert "layer 0 post_attn" in message and "its own copy of the weight" in message
    assert graph_bytes(model) == before


def test_projection_output_read_elsewhere_is_refused(exported_graph):
    _, path = exported_graph("glm4")
    model = ir.load(path)
    down = ModelMap.from_model(model).layers[2].ffn.down
    model.graph.outputs.append(down.output)  # someone reads the un-normalised FFN output
    before = graph_bytes(model)
    with pytest.raises(PanguLightError, match=f"layer 2 post_ffn.*its output {down.output.name} is also read"):
        run_pipeline(model, absorb(s_inv_values(8)))
    assert graph_bytes(model) == before


@pytest.mark.parametrize(
    "options, message",
    [
        ("", "give exactly one of s_inv"),
        ("s_inv=[0.5],plan=true", "give exactly one of s_inv"),
        ("s_inv=[0.5,0.5,0.5]", "s_inv has 3 values but the graph has 8 post-norms"),
        ("s_inv=[0.5,0.5,0.5,0.5,0.5,-1,0.5,0.5]", r"layer 2 post_ffn .*s_inv=-1.0 must be a positive"),
        ("plan=true", "plan=true but the graph carries no plan"),
    ],
)
def test_bad_requests_are_clear_errors(exported_graph, options, message):
    _, path = exported_graph("gemma2")
    with pytest.raises(PanguLightError, match=message.replace("[", r"\[")):
        run_pipeline(ir.load(path), f"absorb-post-norm{{{options}}}" if options else "absorb-post-norm")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_plan_with_wrong_names_is_a_clear_error(exported_graph, change):
    hf_model, path = exported_graph("gemma3")
    model = ir.load(path)
    plan = PrunePlan.identity(ModelMap.from_model(model))
    table = dict(zip(gamma_names(hf_model), s_inv_values(8)))
    if change == "missing":
        del table["model.layers.3.post_feedforward_layernorm.weight"]
        message = "the plan has no s_inv for model.layers.3.post_feedforward_layernorm.weight"
    else:
        table["model.layers.0.input_layernorm.weight"] = 0.5
        message = "s_inv for model.layers.0.input_layernorm.weight, which is not a post-norm gamma"
    plan.post_norm_s_inv = table
    plan.attach(model)
    with pytest.raises(PanguLightError, match=message):
        run_pipeline(model, "absorb-post-norm{plan=true}")
