"""drop-layers: the rewritten graph equals the same layers removed from the PyTorch module."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.core.records import layer_origins, pass_records
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import format_value
from pangu_light.passes.infra.plan import ClapMerge, PrunePlan

from reference import (
    assert_unchanged,
    compile_graph,
    decode_diff,
    graph_bytes,
    left_padded_batch,
    max_diff_on_tokens,
    ort_logits,
    torch_drop_layers,
    torch_logits,
)

TOLERANCE = 1e-5


@pytest.mark.parametrize("drop", [[1], [0, 3], [1, 2]], ids=["middle", "first+last", "chain"])
def test_no_cache_matches_torch(exported_graph, family, drop, tmp_path):
    hf_model, path = exported_graph(family)
    pruned, report = compile_graph(path, f"drop-layers{{layers={format_value(drop)}}}", tmp_path / "p.onnx")
    assert report.records[0].stats["layers_removed"] == len(drop)
    assert len(ModelMap.from_model(pruned).layers) == 4 - len(drop)
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    expected = torch_logits(torch_drop_layers(hf_model, drop), ids, mask)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= TOLERANCE
    # ... and it really changed the function: the unpruned model gives other logits.
    assert max_diff_on_tokens(got, torch_logits(hf_model, ids, mask), mask) > 1e-3


def test_decode_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    drop = [0, 2]
    pruned, _ = compile_graph(path, "drop-layers{layers=[0,2]}", tmp_path / "p.onnx")
    names = [v.name for v in pruned.graph.inputs]
    assert [n for n in names if n.startswith("past_key_values.")] == [
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"
    ]
    assert [v.name for v in pruned.graph.outputs][1:] == [
        "present.0.key", "present.0.value", "present.1.key", "present.1.value"
    ]
    assert decode_diff(tmp_path / "p.onnx", torch_drop_layers(hf_model, drop)) <= TOLERANCE


def test_renumbers_weights_and_scopes(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    pruned, _ = compile_graph(path, "drop-layers{layers=[1]}", tmp_path / "p.onnx")
    names = set(pruned.graph.initializers)
    assert "model.layers.3.self_attn.q_proj.weight" not in names
    assert "model.layers.2.self_attn.q_proj.weight" in names
    model_map = ModelMap.from_model(pruned)
    assert [layer.module for layer in model_map.layers] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert model_map.layers[1].attention.q.weight.name == "model.layers.1.self_attn.q_proj.weight"
    renamed = pruned.graph.initializers["model.layers.1.self_attn.q_proj.weight"]
    assert renamed.metadata_props["pangu_light.pass"] == "drop-layers"


def test_records_the_original_index_of_each_kept_layer(exported_graph):
    """Dropping twice composes: layer 1 of [0, 2, 3] is original layer 2, so [0, 3] remain."""
    _, path = exported_graph("llama")
    model = ir.load(path)
    assert layer_origins(model.metadata_props) is None
    run_pipeline(model, "drop-layers{layers=[1]}")
    assert layer_origins(model.metadata_props) == [0, 2, 3]
    run_pipeline(model, "drop-layers{layers=[1]}")
    assert layer_origins(model.metadata_props) == [0, 3]
    assert [r["stats"]["removed"] for r in pass_records(model.metadata_props)] == [[1], [1]]
    assert len(ModelMap.from_model(model).layers) == 2


def test_empty_list_changes_nothing(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    assert_unchanged(path, "drop-layers{layers=[]}", tmp_path / "p.onnx")


@pytest.mark.parametrize(
    "layers, message",
    [
        ("[4]", "layer index 4 is out of range; this model has layers 0..3"),
        ("[-1]", "layer index -1 is out of range"),
        ("[0,1,2,3]", "removing all 4 layers leaves no model"),
        ("[1,1]", "names a layer twice"),
    ],
)
def test_bad_requests_are_clear_errors(exported_graph, layers, message):
    _, path = exported_graph("llama")
    with pytest.raises(PanguLightError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run_pipeline(ir.load(path), f"drop-layers{{layers={layers}}}")


def _clap_plan(model: ir.Model) -> PrunePlan:
    """Layers 1 and 3 go; the plan merges layer 3's group 1 into layer 2 (CLAP)."""
    plan = PrunePlan.identity(ModelMap.from_model(model))
    plan.drop_layers, plan.clap = [1, 3], True
    plan.clap_merges = [ClapMerge(3, 2, [(2, 0), (3, 1)])]
    plan.attach(model)
    return plan


def test_clap_false_is_plain_removal(exported_graph):
    """A CLAP plan run with clap=false removes the layers plainly: the same bytes as layers=[...]."""
    _, path = exported_graph("qwen3")
    plain, ablation, merged = ir.load(path), ir.load(path), ir.load(path)
    for model in (plain, ablation, merged):
        _clap_plan(model)
    run_pipeline(plain, "drop-layers{layers=[1,3]}")
    report = run_pipeline(ablation, _clap_plan(ablation).pipeline(clap=False))
    assert str(report.records[0].spec) == "drop-layers{plan=true,clap=false}"
    run_pipeline(merged, "drop-layers{plan=true}")
    assert graph_bytes(ablation) == graph_bytes(plain)
    assert graph_bytes(merged) != graph_bytes(plain)


def test_clap_needs_the_plan(exported_graph):
    _, path = exported_graph("llama")
    with pytest.raises(PanguLightError, match=r"clap=true needs plan=true"):
        run_pipeline(ir.load(path), "drop-layers{layers=[1],clap=true}")
