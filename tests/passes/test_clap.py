"""CLAP (drop-layers with the plan's merges): the merged graph equals the same merge done on
the PyTorch module (tests/reference_clap.py), for every family, no-cache and decode, on a
left-padded batch; it is plain removal when the receiver keeps its own groups; bad merges are
clear errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import ClapMerge, PrunePlan

from reference import (
    decode_diff,
    graph_bytes,
    left_padded_batch,
    max_diff_on_tokens,
    no_cache_diff,
    ort_logits,
    torch_drop_layers,
    torch_logits,
)
from reference_clap import torch_clap, torch_fold_post_attention_scale
from reference_norm import POST_NORM_MODULES, gamma_names, torch_scale_post_norms
from reference_width import torch_prune_attention

TOLERANCE = 1e-5


def layer_type(hf_model, index: int) -> str:
    types = getattr(hf_model.config, "layer_types", None)
    return types[index] if types else "full_attention"


def scenario(hf_model, name: str):
    """(kv_groups, heads, drop, {receiver: groups}) in original numbering, on the 4-layer tiny
    models (2 KV groups of 2 query heads). Groups come only from layers of the receiver's type
    (read off the HF config: Gemma2 alternates sliding/global, Gemma3 has layer 2 global)."""
    kv_groups = [[0, 1]] * 4
    heads = [[0, 1, 2, 3]] * 4
    if name == "chain":
        # Layers 2 and 3 (the last) merge into 1; every layer involved is width-pruned first:
        # one head per group, and layer 3 keeps only group 1 (so its position changes).
        heads = [[0, 1, 2, 3], [1, 2], [0, 2], [3]]
        kv_groups = [[0, 1], [0, 1], [0, 1], [1]]
        groups = [(3, 1), (1, 0)]
        if layer_type(hf_model, 2) == layer_type(hf_model, 1):
            groups.append((2, 0))  # three groups: the receiver grows
        return kv_groups, heads, [2, 3], {1: groups}
    if name == "first":
        # The first layer merges forward into the next kept layer of its type.
        if layer_type(hf_model, 0) == layer_type(hf_model, 1):
            return kv_groups, heads, [0], {1: [(0, 1), (1, 0)]}
        return kv_groups, heads, [0, 1], {2: [(0, 1), (2, 0)]}
    raise KeyError(name)


def make_clap_plan(model: ir.Model, kv_groups, heads, drop, merges) -> PrunePlan:
    plan = PrunePlan.identity(ModelMap.from_model(model))
    for layer_plan, groups, kept in zip(plan.layers, kv_groups, heads):
        layer_plan.kv_groups, layer_plan.heads = list(groups), list(kept)
    plan.drop_layers = list(drop)
    plan.clap = True
    sources = {layer for groups in merges.values() for layer, _ in groups}
    plan.clap_merges = [
        ClapMerge(removed, into, list(groups))
        for into, groups in merges.items()
        for removed in drop
        if removed in sources
    ]
    plan.validate()
    plan.attach(model)
    return plan


@pytest.mark.parametrize("name", ["chain", "first"])
def test_no_cache_matches_torch(exported_graph, family, name, tmp_path):
    hf_model, path = exported_graph(family)
    model = ir.load(path)
    kv_groups, heads, drop, merges = scenario(hf_model, name)
    plan = make_clap_plan(model, kv_groups, heads, drop, merges)
    report = run_pipeline(model, plan.pipeline(), verify=True)
    ir.save(model, tmp_path / "p.onnx")
    stats = report.records[-1].stats
    ((into, groups),) = merges.items()
    assert stats["kv_groups_merged"] == sum(layer != into for layer, _ in groups)
    merged = ModelMap.from_model(model).layer(into - sum(d < into for d in drop)).attention
    assert merged.num_kv_heads == len(groups)

    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    expected = torch_logits(torch_clap(hf_model, kv_groups, heads, drop, merges), ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= TOLERANCE
    # ... and the merge mattered: plain removal of the same layers gives other logits.
    plain = torch_drop_layers(torch_prune_attention(hf_model, kv_groups, heads), drop)
    assert max_diff_on_tokens(got, torch_logits(plain, ids, mask), mask) > 1e-3


def test_decode_matches_torch(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family, kv_cache=True)
    model = ir.load(path)
    kv_groups, heads, drop, merges = scenario(hf_model, "chain")
    plan = make_clap_plan(model, kv_groups, heads, drop, merges)
    run_pipeline(model, plan.pipeline(), verify=True)
    ir.save(model, tmp_path / "p.onnx")
    (into, groups), = merges.items()
    assert [v.shape[1] for v in model.graph.inputs if v.name == f"past_key_values.{into}.key"] == [len(groups)]
    assert decode_diff(tmp_path / "p.onnx", torch_clap(hf_model, kv_groups, heads, drop, merges)) <= TOLERANCE


@pytest.mark.parametrize("family, layout", [("qwen3", (3, 16)), ("gemma3", (2, 1, 16))])
def test_qk_norms_become_per_head(exported_graph, family, layout):
    """A merged layer's q/k norm holds each head's own layer's gamma; [d] when one layer's."""
    hf_model, path = exported_graph(family)
    model = ir.load(path)
    kv_groups, heads, drop, merges = scenario(hf_model, "chain")
    plan = make_clap_plan(model, kv_groups, heads, drop, merges)
    run_pipeline(model, plan.pipeline())
    q_gamma = model.graph.initializers["model.layers.1.self_attn.q_norm.weight"].const_value.numpy()
    k_gamma = model.graph.initializers["model.layers.1.self_attn.k_norm.weight"].const_value.numpy()
    assert q_gamma.shape == layout and k_gamma.shape == layout  # one head per group here
    rows = [hf_model.model.layers[layer].self_attn.q_norm.weight.detach().numpy() for layer, _ in merges[1]]
    np.testing.assert_array_equal(q_gamma.reshape(len(rows), -1), np.stack(rows))
    # All groups from the removed layer: its gamma, still one vector.
    model = ir.load(path)
    plan = make_clap_plan(model, kv_groups, heads, [2, 3], {1: [(3, 1)]})
    run_pipeline(model, plan.pipeline())
    q_gamma = model.graph.initializers["model.layers.1.self_attn.q_norm.weight"].const_value.numpy()
    np.testing.assert_array_equal(q_gamma, hf_model.model.layers[3].self_attn.q_norm.weight.detach().numpy())


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "glm4"])
def test_absorbed_post_norms_travel_with_their_columns(exported_graph, family, tmp_path):
    """After absorb-post-norm, a transplanted o_proj column keeps its own layer's s_inv * gamma."""
    hf_model, path = exported_graph(family)
    model = ir.load(path)
    kv_groups, heads, drop, merges = scenario(hf_model, "chain")
    plan = make_clap_plan(model, kv_groups, heads, drop, merges)
    names = gamma_names(hf_model)
    s_inv = np.random.default_rng(0).uniform(0.2, 3.0, len(names)).round(6).tolist()
    plan.absorb_post_norms, plan.post_norm_s_inv = True, dict(zip(names, s_inv))
    plan.attach(model)
    run_pipeline(model, plan.pipeline(), verify=True)
    ir.save(model, tmp_path / "p.onnx")
    folded = torch_fold_post_attention_scale(torch_scale_post_norms(hf_model, s_inv), POST_NORM_MODULES[family][0])
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    got = ort_logits(tmp_path / "p.onnx", ids, mask)
    expected = torch_logits(torch_clap(folded, kv_groups, heads, drop, merges), ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= TOLERANCE


# ------------------------------------------------------------------ CLAP that changes nothing


def test_own_groups_are_plain_removal_byte_for_byte(exported_graph, family):
    _, path = exported_graph(family)
    kv_groups, heads = [[0, 1]] * 4, [[0, 2], [0, 2], [0, 2], [1, 3]]
    results = []
    for clap in (True, False):
        model = ir.load(path)
        make_clap_plan(model, kv_groups, heads, [2, 3], {1: [(1, 0), (1, 1)]})
        run_pipeline(model, f"prune-heads{{plan=true}},drop-layers{{plan=true,clap={str(clap).lower()}}}")
        results.append(graph_bytes(model))
    assert results[0] == results[1]


def fake_stats(model_map: ModelMap, heads: list[list[float]], block_influence: list[float]) -> CalibrationStats:
    rng = np.random.default_rng(0)
    return CalibrationStats(
        channel=rng.random(model_map.hidden_size),
        heads=[np.asarray(h, np.float64) for h in heads],
        ffn=[rng.random(l.ffn.intermediate_size) for l in model_map.layers],
        block_influence=np.asarray(block_influence, np.float64),
        s_inv={}, gamma={}, tokens=100, meta={"aggregation": "paper"},
    )


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_planner_clap_with_stronger_receiver_equals_plain_removal(exported_graph, family):
    """Every group of the receiver outranks the removed layer's: the planner's CLAP plan
    compiles to the same bytes as plain removal (the same plan, clap=false)."""
    _, path = exported_graph(family)
    model_map = ModelMap.from_model(ir.load(path))
    heads = [[5, 5, 5, 5], [4, 4, 3, 3], [1, 2, 1, 2], [5, 5, 5, 5]]
    stats = fake_stats(model_map, heads, [0.9, 0.8, 0.1, 0.7])
    plan = make_plan(model_map, stats, Targets(drop_layers=1, heads_per_group=1, clap=True))
    assert [(m.removed, m.into, m.groups) for m in plan.clap_merges] == [(2, 1, [(1, 0), (1, 1)])]
    results = []
    for clap in (None, False):
        model = ir.load(path)
        plan.attach(model)
        report = run_pipeline(model, plan.pipeline(clap=clap), verify=True)
        assert "kv_groups_merged" not in report.records[-1].stats
        results.append(graph_bytes(model))
    assert results[0] == results[1]


def test_planner_plan_matches_torch(exported_graph, tmp_path):
    """The planner's choice, compiled, equals the torch merge of the same choice."""
    hf_model, path = exported_graph("qwen3")
    model = ir.load(path)
    model_map = ModelMap.from_model(model)
    heads = [[5, 5, 5, 5], [1, 1, 3, 3], [9, 1, 2, 2], [1, 1, 1, 1]]
    stats = fake_stats(model_map, heads, [0.9, 0.8, 0.1, 0.7])
    plan = make_plan(model_map, stats, Targets(drop_layers=1, heads_per_group=1, clap=True))
    (merge,) = plan.clap_merges
    assert merge.groups == [(1, 1), (2, 0)]  # 9.0 (layer 2, group 0) and 3.0 (layer 1, group 1) beat 2.0 and 1.0
    plan.attach(model)
    run_pipeline(model, plan.pipeline(), verify=True)
    ir.save(model, tmp_path / "p.onnx")
    kv_groups = [l.kv_groups for l in plan.layers]
    kept = [l.heads for l in plan.layers]
    reference = torch_clap(hf_model, kv_groups, kept, [2], {1: merge.groups})
    assert no_cache_diff(tmp_path / "p.onnx", reference) <= TOLERANCE


# ------------------------------------------------------------------ errors


def _plan_with(path, merges: list[ClapMerge], drop=(2, 3), heads=None, kv_groups=None) -> ir.Model:
    model = ir.load(path)
    plan = PrunePlan.identity(ModelMap.from_model(model))
    for layer_plan, groups, kept in zip(plan.layers, kv_groups or [[0, 1]] * 4, heads or [[0, 1, 2, 3]] * 4):
        layer_plan.kv_groups, layer_plan.heads = list(groups), list(kept)
    plan.drop_layers, plan.clap, plan.clap_merges = list(drop), True, merges
    plan.attach(model)
    return model


@pytest.mark.parametrize(
    "merges, message",
    [
        ([ClapMerge(2, 1, [(2, 0), (4, 0)])], "neither layer 1 nor a removed layer merging into it"),
        ([ClapMerge(2, 1, [(0, 0), (1, 0)])], "takes group 0 of layer 0, which is neither"),
        ([ClapMerge(2, 3, [(2, 0)])], "merges into layer 3, which is removed too"),
        ([ClapMerge(1, 0, [(1, 0)])], "removes layer 1, but the plan's drop_layers"),
        ([ClapMerge(2, 7, [(2, 0)])], "goes into layer 7, which does not exist"),
        ([ClapMerge(2, 1, [(2, 0)]), ClapMerge(3, 1, [(3, 0)])], "list different groups"),
        ([ClapMerge(2, 1, [(2, 0)]), ClapMerge(2, 1, [(2, 0)])], "layer 2 has two CLAP merges"),
        ([ClapMerge(2, 1, [(2, 0), (2, 0)])], "names a group twice"),
        ([ClapMerge(2, 1, [])], "keeps no KV group"),
    ],
)
def test_bad_merges_are_clear_errors(exported_graph, merges, message):
    _, path = exported_graph("llama")
    with pytest.raises(PanguLightError, match=message.replace("'", ".")):
        run_pipeline(_plan_with(path, merges), "drop-layers{plan=true}")


def test_group_the_layer_does_not_keep_is_refused(exported_graph):
    _, path = exported_graph("llama")
    model = _plan_with(path, [ClapMerge(2, 1, [(2, 0)])], kv_groups=[[0, 1], [0, 1], [1], [0, 1]],
                       heads=[[0, 1, 2, 3], [0, 1, 2, 3], [2, 3], [0, 1, 2, 3]])
    with pytest.raises(PanguLightError, match=r"group 0 of layer 2, but that layer keeps only groups \[1\]"):
        run_pipeline(model, "prune-kv-groups{plan=true},drop-layers{plan=true}")


def test_merging_before_width_pruning_is_refused(exported_graph):
    _, path = exported_graph("llama")
    model = _plan_with(path, [ClapMerge(2, 1, [(2, 0)])], heads=[[0, 1, 2, 3], [0, 2], [0, 2], [0, 1, 2, 3]])
    with pytest.raises(PanguLightError, match="run prune-kv-groups.*before drop-layers"):
        run_pipeline(model, "drop-layers{plan=true}")


def test_different_heads_per_group_are_refused(exported_graph):
    _, path = exported_graph("llama")
    heads = [[0, 1, 2, 3], [0, 2], [0, 1, 2, 3], [0, 1, 2, 3]]
    model = _plan_with(path, [ClapMerge(2, 1, [(1, 0), (2, 0)])], heads=heads)
    with pytest.raises(PanguLightError, match="keeps 2 query heads per group and layer 1 keeps 1"):
        run_pipeline(model, "prune-heads{plan=true},drop-layers{plan=true}")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_merging_across_layer_types_is_refused(exported_graph, family):
    """Gemma2 layer 1 is global, layer 2 sliding; Gemma3 layer 1 sliding, layer 2 global (and
    another rope base): a group moved between them would change its window or rotary."""
    hf_model, path = exported_graph(family)
    assert layer_type(hf_model, 1) != layer_type(hf_model, 2)
    model = _plan_with(path, [ClapMerge(2, 1, [(1, 0), (2, 0)])], drop=[2])
    with pytest.raises(PanguLightError, match="different attention types .*rotary/mask"):
        run_pipeline(model, "drop-layers{plan=true}")
    # The same merge between two layers of one type is fine.
    assert layer_type(hf_model, 1) == layer_type(hf_model, 3)  # gemma2: both global; gemma3: both sliding
    run_pipeline(_plan_with(path, [ClapMerge(3, 1, [(1, 0), (3, 0)])], drop=[2, 3]), "drop-layers{plan=true}")


def test_clap_option_needs_merges(exported_graph):
    _, path = exported_graph("llama")
    model = _plan_with(path, [], drop=[2])
    plan = PrunePlan.from_model(model, "test")
    plan.clap = False
    plan.attach(model)
    with pytest.raises(PanguLightError, match="records no CLAP merges"):
        run_pipeline(model, "drop-layers{plan=true,clap=true}")
    run_pipeline(model, "drop-layers{plan=true}")  # the plan's own setting: plain removal


def test_removing_every_layer_is_refused(exported_graph):
    _, path = exported_graph("llama")
    with pytest.raises(PanguLightError, match="removes all 4 layers"):
        run_pipeline(_plan_with(path, [ClapMerge(1, 0, [(1, 0)])], drop=[0, 1, 2, 3]), "drop-layers{plan=true}")


def test_dropped_layer_that_does_not_exist_is_refused(exported_graph):
    _, path = exported_graph("llama")
    with pytest.raises(PanguLightError, match="drop_layers names layer 4"):
        run_pipeline(_plan_with(path, [ClapMerge(4, 1, [(1, 0)])], drop=[4]), "drop-layers{plan=true}")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotate_then_clap_matches_torch(exported_graph, family, tmp_path):
    """A rotate plan with CLAP merges: rotate-hidden folds each layer's gamma into its own q/k/v,
    then the merge copies rows; the graph equals the same rotation then merge on the PyTorch module."""
    from reference_rotation import torch_rotate_hidden

    from pangu_light.passes.rewrites.rotate_hidden import Rotation, random_rotation, save_rotation

    hf_model, path = exported_graph(family)
    hidden, kept = hf_model.config.hidden_size, 40
    rng = np.random.default_rng(4)
    names = [f"{n}.weight" for n, m in hf_model.named_modules() if type(m).__name__.endswith("RMSNorm")
             and not n.endswith(("q_norm", "k_norm"))]
    rotation = Rotation(random_rotation(hidden, 4), {name: rng.dirichlet(np.ones(hidden)) for name in names})
    save_rotation(tmp_path / "rotation.npz", rotation)
    correction = {name: float(np.sqrt(hidden / kept * e[:kept].sum())) for name, e in rotation.energy.items()}

    model = ir.load(path)
    kv_groups, heads, drop, merges = scenario(hf_model, "chain")
    plan = make_clap_plan(model, kv_groups, heads, drop, merges)
    plan.hidden_method, plan.hidden = "rotate", list(range(kept))
    plan.rotation = {"file": str(tmp_path / "rotation.npz")}
    plan.attach(model)
    run_pipeline(model, plan.pipeline(), verify=True)
    ir.save(model, tmp_path / "p.onnx")
    reference = torch_clap(torch_rotate_hidden(hf_model, rotation.basis, kept, correction), kv_groups, heads, drop,
                           merges)
    assert no_cache_diff(tmp_path / "p.onnx", reference) <= TOLERANCE
    ids, mask = left_padded_batch(hf_model.config.vocab_size)  # the merge mattered
    plain = torch_drop_layers(torch_prune_attention(torch_rotate_hidden(hf_model, rotation.basis, kept, correction),
                                                    kv_groups, heads), drop)
    assert max_diff_on_tokens(torch_logits(reference, ids, mask), torch_logits(plain, ids, mask), mask) > 1e-3
