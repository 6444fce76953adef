"""prune-kv-groups: the rewritten graph equals the same KV groups removed from the PyTorch
module, and the original model with those groups' query heads zeroed in o_proj; with a plan
(plan=true), KV groups and heads compose in either order."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import format_value
from pangu_light.passes.infra.plan import PrunePlan

from reference import (
    assert_refused,
    assert_unchanged,
    compile_graph,
    decode_diff,
    left_padded_batch,
    max_diff_on_tokens,
    no_cache_diff,
    ort_logits,
    torch_drop_layers,
    torch_logits,
    torch_slice_hidden,
)
from reference_width import (
    torch_prune_attention,
    torch_prune_ffn,
    torch_prune_kv_groups,
    torch_slnp,
    torch_zero_heads,
)

TOLERANCE = 1e-5
# Tiny models: 2 KV groups of 2 query heads. Layers end with 1, 2, 1, 1 groups.
KEEP = [[1], [0, 1], [0], [1]]
PIPELINE = f"prune-kv-groups{{keep={format_value(KEEP)}}}"
HEADS_OF_KEPT_GROUPS = [[2, 3], [0, 1, 2, 3], [0, 1], [2, 3]]


def test_no_cache_matches_torch_and_zeroed_groups(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    pruned, report = compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    assert report.records[0].stats["kv_groups_removed"] == 3
    model_map = ModelMap.from_model(pruned)
    assert [layer.attention.num_kv_heads for layer in model_map.layers] == [1, 2, 1, 1]
    assert [layer.attention.num_heads for layer in model_map.layers] == [2, 4, 2, 2]
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    expected = torch_logits(torch_prune_kv_groups(hf_model, KEEP), ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= TOLERANCE
    zeroed = torch_logits(torch_zero_heads(hf_model, HEADS_OF_KEPT_GROUPS), ids, mask)
    assert max_diff_on_tokens(got, zeroed, mask) <= TOLERANCE
    assert max_diff_on_tokens(got, torch_logits(hf_model, ids, mask), mask) > 1e-3


def test_decode_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    pruned, report = compile_graph(path, PIPELINE, tmp_path / "p.onnx")
    io = {v.name: v for v in [*pruned.graph.inputs, *pruned.graph.outputs]}
    for index, groups in enumerate(KEEP):
        for name in (f"past_key_values.{index}.key", f"present.{index}.value"):
            assert io[name].shape[1] == len(groups), name
            tag = io[name].metadata_props.get("pangu_light.pass")
            assert tag == ("prune-kv-groups" if len(groups) < 2 else None), name
    assert decode_diff(tmp_path / "p.onnx", torch_prune_kv_groups(hf_model, KEEP)) <= TOLERANCE


def test_decode_chained_with_heads_and_drop_layers(exported_graph, tmp_path):
    """Per-layer KV counts survive drop-layers' renumbering of the cache inputs/outputs."""
    hf_model, path = exported_graph("mistral", kv_cache=True)
    pipeline = f"{PIPELINE},prune-heads{{per_group=1}},drop-layers{{layers=[2]}}"
    pruned, _ = compile_graph(path, pipeline, tmp_path / "p.onnx")
    io = {v.name: v for v in [*pruned.graph.inputs, *pruned.graph.outputs]}
    assert [io[f"present.{i}.key"].shape[1] for i in range(3)] == [1, 2, 1]
    heads = [[2], [0, 2], [0], [2]]  # the first head of each kept group
    reference = torch_drop_layers(torch_prune_attention(hf_model, KEEP, heads), [2])
    assert decode_diff(tmp_path / "p.onnx", reference) <= TOLERANCE


def test_keeping_everything_changes_nothing(exported_graph, tmp_path):
    _, path = exported_graph("qwen2", kv_cache=True)
    assert_unchanged(path, "prune-kv-groups{keep=[[0,1],[1,0],[0,1],[0,1]]}", tmp_path / "p.onnx")


@pytest.mark.parametrize(
    "options, message",
    [
        ("keep=[[1],[],[0],[1]]", "layer 1 keeps no KV groups; keep at least one"),
        ("keep=[[2],[0],[0],[1]]", "layer 0: KV group 2 does not exist; the layer has 2 (0..1)"),
        ("keep=[[1],[0],[0]]", "keep has 3 entries but the model has 4 layers"),
        ("keep=[[1,1],[0],[0],[1]]", "layer 0 names KV group 1 twice"),
        ("plan=false", "give exactly one of keep"),
    ],
)
def test_bad_requests_are_clear_errors(exported_graph, options, message):
    _, path = exported_graph("llama")
    assert_refused(path, f"prune-kv-groups{{{options}}}", message)


# ---------------------------------------------------------------- plan=true, all width axes

# In the ORIGINAL numbering (query head h is in group h // 2). Layer 0 keeps group 1 and one
# of its heads; layer 1 both groups, one head each; layer 2 group 0 whole; layer 3 all.
PLAN_GROUPS = [[1], [0, 1], [0], [0, 1]]
PLAN_HEADS = [[3], [0, 3], [0, 1], [0, 1, 2, 3]]
PLAN_FFN = [sorted(np.random.default_rng(i).choice(96, size=n, replace=False).tolist())
            for i, n in enumerate([40, 96, 17, 60])]
PLAN_HIDDEN = sorted(np.random.default_rng(9).choice(64, size=44, replace=False).tolist())


def _plan(model: ir.Model) -> PrunePlan:
    plan = PrunePlan.identity(ModelMap.from_model(model))
    plan.hidden = PLAN_HIDDEN
    for layer, groups, heads, ffn in zip(plan.layers, PLAN_GROUPS, PLAN_HEADS, PLAN_FFN):
        layer.kv_groups, layer.heads, layer.ffn = groups, heads, ffn
    plan.validate()
    plan.attach(model)
    return plan


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
@pytest.mark.parametrize("order", ["groups-first", "heads-first"])
def test_plan_matches_torch(exported_graph, family, order, tmp_path):
    hf_model, path = exported_graph(family)
    model = ir.load(path)
    plan = _plan(model)
    pipeline = plan.pipeline()
    assert [spec.name for spec in pipeline] == ["prune-kv-groups", "prune-heads", "prune-ffn", "slice-hidden", "slnp"]
    if order == "heads-first":
        pipeline.passes[0], pipeline.passes[1] = pipeline.passes[1], pipeline.passes[0]
    report = run_pipeline(model, pipeline, verify=True)
    assert all(record.modified for record in report.records)
    ir.save(model, tmp_path / "p.onnx")
    model_map = ModelMap.from_model(model)
    assert [layer.attention.num_kv_heads for layer in model_map.layers] == [1, 2, 1, 2]
    assert [layer.attention.num_heads for layer in model_map.layers] == [1, 2, 2, 4]
    assert [layer.ffn.intermediate_size for layer in model_map.layers] == [40, 96, 17, 60]
    reference = torch_prune_ffn(torch_prune_attention(hf_model, PLAN_GROUPS, PLAN_HEADS), PLAN_FFN)
    reference = torch_slnp(torch_slice_hidden(reference, PLAN_HIDDEN), hf_model)
    assert no_cache_diff(tmp_path / "p.onnx", reference) <= TOLERANCE
    # Running the plan's passes again finds nothing left to do.
    again = run_pipeline(model, plan.pipeline())
    assert not any(record.modified for record in again.records)


def test_plan_decode_and_slnp_off(exported_graph, tmp_path):
    hf_model, path = exported_graph("glm4", kv_cache=True)
    model = ir.load(path)
    plan = _plan(model)
    run_pipeline(model, plan.pipeline(slnp=False), verify=True)
    ir.save(model, tmp_path / "p.onnx")
    reference = torch_prune_ffn(torch_prune_attention(hf_model, PLAN_GROUPS, PLAN_HEADS), PLAN_FFN)
    reference = torch_slice_hidden(reference, PLAN_HIDDEN)
    assert decode_diff(tmp_path / "p.onnx", reference, steps=3) <= TOLERANCE
