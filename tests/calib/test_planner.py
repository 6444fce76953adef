"""The planner: choices follow the statistics, budgets are met, impossible targets are errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.budget import SPREADS, resolve_shape, resolve_spread
from pangu_light.calib.planner import Targets, _ffn_choice, make_plan
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import Shape, count_parameters
from pangu_light.passes.analysis.parameters import shape_of as original_shape
from pangu_light.passes.infra.plan import PrunePlan, load_plan


def fake_stats(model_map: ModelMap, seed: int = 0) -> CalibrationStats:
    """Statistics of the right shapes with distinct random values (the planner only ranks)."""
    rng = np.random.default_rng(seed)
    return CalibrationStats(
        channel=rng.random(model_map.hidden_size),
        heads=[rng.random(l.attention.num_heads) for l in model_map.layers],
        ffn=[rng.random(l.ffn.intermediate_size) for l in model_map.layers],
        block_influence=rng.random(len(model_map.layers)),
        s_inv={
            n.gamma.name: float(rng.random())
            for l in model_map.layers for r, n in l.norms.items() if r.startswith("post")
        },
        gamma={},
        tokens=100,
        meta={"aggregation": "paper"},
    )


@pytest.fixture
def llama_map(exported_graph):
    _, path = exported_graph("llama")
    return ModelMap.from_model(ir.load(path))


def test_parameter_count_matches_graph_stats(exported_graph, family):
    _, path = exported_graph(family)
    model = ir.load(path)
    model_map = ModelMap.from_model(model)
    assert count_parameters(model_map, original_shape(model_map)) == GraphStats.from_model(model).total_parameters


def test_choices_follow_the_statistics(llama_map):
    stats = fake_stats(llama_map)
    plan = make_plan(
        llama_map, stats, Targets(hidden=40, heads_per_group=1, kv_groups=1, ffn=50, drop_layers=1, uniform=True)
    )
    assert plan.hidden == sorted(np.argsort(-stats.channel)[:40].tolist())
    for layer, layer_plan in zip(llama_map.layers, plan.layers):
        heads = stats.heads[layer.index]  # 4 heads in 2 groups of 2
        best_group = int(np.argmax(heads.reshape(2, 2).mean(1)))
        assert layer_plan.kv_groups == [best_group]
        assert layer_plan.heads == [best_group * 2 + int(np.argmax(heads[best_group * 2 : best_group * 2 + 2]))]
        if layer.index not in plan.drop_layers:
            assert layer_plan.ffn == sorted(np.argsort(-stats.ffn[layer.index])[:50].tolist())
    assert plan.drop_layers == [int(np.argmin(stats.block_influence))]


def test_plan_round_trips_through_json(tmp_path, exported_graph):
    _, path = exported_graph("gemma2")
    model_map = ModelMap.from_model(ir.load(path))
    # Gemma2 alternates sliding/global layers: 3 merges into 1 (same type), 2 is removed plainly.
    plan = make_plan(
        model_map, fake_stats(model_map), Targets(params=0.5, layers=[2, 3], clap=True, absorb_post_norms=True)
    )
    plan.save(tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json")
    assert again.to_json() == plan.to_json()
    assert again.post_norm_s_inv and again.slnp_scales and again.clap_merges


@pytest.mark.parametrize("budget", [0.4, 0.62, 0.8, 1.0])
@pytest.mark.parametrize("uniform", [True, False])
def test_budget_is_met_within_one_percent(llama_map, budget, uniform):
    plan = make_plan(llama_map, fake_stats(llama_map), Targets(params=budget, uniform=uniform))
    assert abs(plan.estimate["parameter_ratio"] - budget) <= 0.01 * budget
    shape_params = plan.estimate["parameters_after"]
    assert shape_params == count_parameters(llama_map, _shape_of(plan))


@pytest.mark.real_model
def test_budget_on_smollm2(smollm2_graph):
    model_map = ModelMap.from_model(ir.load(smollm2_graph()))
    plan = make_plan(model_map, fake_stats(model_map), Targets(params=0.62, align=32, uniform=True))
    assert abs(plan.estimate["parameter_ratio"] - 0.62) <= 0.0062
    assert plan.estimate["hidden"] % 32 == 0 and plan.estimate["ffn"] % 32 == 0


@pytest.mark.parametrize("budget", [0.5, 0.62, 0.8])
def test_hidden_light_spread_cuts_the_hidden_size_least(llama_map, budget):
    """The default spread: the hidden size shrinks a fifth as fast as the FFN, the query heads half
    as fast; ``even`` shrinks them by one factor (the first version's rule); both meet the budget."""
    stats = fake_stats(llama_map)
    light = make_plan(llama_map, stats, Targets(params=budget, align=2))
    even = make_plan(llama_map, stats, Targets(params=budget, align=2, spread="even"))
    hidden = llama_map.hidden_size
    for plan in (light, even):
        assert abs(plan.estimate["parameter_ratio"] - budget) <= 0.01 * budget
    assert len(light.hidden) > len(even.hidden)
    hidden_share, heads_share = SPREADS["hidden-light"]
    assert len(light.hidden) >= (1 - hidden_share) * hidden - 2  # at most a fifth cut (align 2)
    full_heads = [layer.attention.num_heads for layer in llama_map.layers]
    assert all(len(p.heads) >= (1 - heads_share) * n for p, n in zip(light.layers, full_heads))
    heads = [sum(len(l.heads) for l in plan.layers) for plan in (light, even)]
    assert light.estimate["ffn"] < even.estimate["ffn"] or heads[0] < heads[1]  # they pay for the channels


def test_a_budget_below_the_light_spread_falls_back_to_even(llama_map):
    stats = fake_stats(llama_map)
    even = make_plan(llama_map, stats, Targets(params=0.2, spread="even"))
    light = make_plan(llama_map, stats, Targets(params=0.2))
    assert len(light.hidden) < (1 - SPREADS["hidden-light"][0]) * llama_map.hidden_size
    assert light.estimate == even.estimate
    with pytest.raises(PanguLightError, match="--spread 'wide': use one of hidden-light, even"):
        make_plan(llama_map, stats, Targets(params=0.8, spread="wide"))


def test_align_rounds_widths(llama_map):
    plan = make_plan(llama_map, fake_stats(llama_map), Targets(hidden=45, ffn=55, align=16))
    assert len(plan.hidden) == 45  # explicit widths are kept as given
    plan = make_plan(llama_map, fake_stats(llama_map), Targets(params=0.6, align=2, uniform=True))
    assert len(plan.hidden) % 2 == 0
    assert all(len(l.ffn) % 2 == 0 for l in plan.layers)


def test_budget_spreads_ffn_over_layers_unless_uniform_or_given(llama_map):
    stats = fake_stats(llama_map)
    spread = make_plan(llama_map, stats, Targets(params=0.6))
    widths = [len(l.ffn) for l in spread.layers]
    assert sum(widths) == 4 * spread.estimate["ffn"] and len(set(widths)) > 1
    uniform = make_plan(llama_map, stats, Targets(params=0.6, uniform=True))
    assert len({len(l.ffn) for l in uniform.layers}) == 1
    given = make_plan(llama_map, stats, Targets(ffn=48))
    assert all(len(l.ffn) == 48 for l in given.layers)


@pytest.mark.parametrize("align", [4, 8])
def test_spread_ffn_widths_are_aligned_per_layer(llama_map, align):
    """--align rounds each layer's spread FFN width, not only the mean width: a block of N neurons
    is the unit of an int4 MatMul, so an unaligned layer wastes its cut. The total stays the
    unaligned spread's, each layer moves by less than one block from it, and keeps its top
    neurons by its own scores."""
    stats = fake_stats(llama_map)
    stats.ffn = [s ** (1 + 3 * i) for i, s in enumerate(stats.ffn)]  # unevenly skewed layers
    targets = Targets(params=0.7, hidden=llama_map.hidden_size, align=align)
    aligned = make_plan(llama_map, stats, targets)
    shape = resolve_shape(llama_map, targets, set())
    before = [len(keep) for _, keep in sorted(_ffn_choice(llama_map, stats, shape, False, 1).items())]
    after = [len(l.ffn) for l in aligned.layers]
    full = [l.ffn.intermediate_size for l in llama_map.layers]
    assert len(set(before)) > 1 and before != after  # the case where rounding matters
    assert all(w % align == 0 or w == f for w, f in zip(after, full))
    assert sum(after) == sum(before) == len(full) * aligned.estimate["ffn"]
    assert all(abs(a - b) < align for a, b in zip(after, before))
    for layer, plan in zip(llama_map.layers, aligned.layers):
        top = np.argsort(-stats.ffn[layer.index], kind="stable")[: len(plan.ffn)]
        assert plan.ffn == sorted(top.tolist())


def test_clap_merges_rank_groups_of_both_layers(llama_map):
    stats = fake_stats(llama_map)
    stats.block_influence = np.array([0.9, 0.8, 0.1, 0.7])  # layer 2 goes, merges into layer 1
    stats.heads[1] = np.array([1.0, 1.0, 5.0, 5.0])  # layer 1: group 1 strong
    stats.heads[2] = np.array([9.0, 9.0, 0.5, 0.5])  # layer 2: group 0 strongest of all
    plan = make_plan(llama_map, stats, Targets(drop_layers=1, clap=True))
    (merge,) = plan.clap_merges
    assert (merge.removed, merge.into) == (2, 1)
    assert merge.groups == [(1, 1), (2, 0)]


def test_clap_of_layer_zero_merges_forward(llama_map):
    stats = fake_stats(llama_map)
    stats.block_influence = np.array([0.0, 0.8, 0.9, 0.7])
    plan = make_plan(llama_map, stats, Targets(drop_layers=1, clap=True))
    assert [(m.removed, m.into) for m in plan.clap_merges] == [(0, 1)]


@pytest.mark.parametrize(
    "targets, message",
    [
        (Targets(heads_per_group=3), "heads per group=3 for layer 0: it has 2"),
        (Targets(kv_groups=0), "KV groups=0"),
        (Targets(hidden=65), "hidden=65"),
        (Targets(drop_layers=4), "leaves no layer"),
        (Targets(layers=[7]), "layer 7 does not exist"),
        (Targets(params=0.001), "below the smallest model"),
        (Targets(params=1.5), "in \\(0, 1\\]"),
        (Targets(ffn=[10, 20, 30]), "3 values for 4 layers"),
        (Targets(ffn=[10, 20, 30, 40], uniform=True), "--uniform"),
        (Targets(absorb_post_norms=True), "no post-norms"),
        (Targets(hidden=45, uniform=True), "not a multiple of the 4 query heads"),
    ],
)
def test_impossible_targets_are_clear_errors(llama_map, targets, message):
    with pytest.raises(PanguLightError, match=message):
        make_plan(llama_map, fake_stats(llama_map), targets)


def test_absorb_max_spread_keeps_the_unsteady_post_norms(exported_graph):
    _, path = exported_graph("gemma3")
    model_map = ModelMap.from_model(ir.load(path))
    stats = fake_stats(model_map)
    names = sorted(stats.s_inv)
    stats.s_inv_spread = {name: 0.05 * (i + 1) for i, name in enumerate(names)}  # 0.05 .. 0.40
    plan = make_plan(model_map, stats, Targets(absorb_post_norms=True, absorb_max_spread=0.2))
    assert plan.post_norm_keep == names[4:]  # spreads 0.25 and up stay real norms
    assert make_plan(model_map, stats, Targets(absorb_post_norms=True)).post_norm_keep == []
    stats.s_inv_spread = {}  # statistics from before the spread existed
    with pytest.raises(PanguLightError, match="re-run `pangu-light calibrate`"):
        make_plan(model_map, stats, Targets(absorb_post_norms=True, absorb_max_spread=0.2))
    with pytest.raises(PanguLightError, match="add --absorb-post-norms"):
        make_plan(model_map, stats, Targets(absorb_max_spread=0.2))


def test_stats_of_another_graph_are_refused(llama_map, exported_graph):
    _, path = exported_graph("qwen2")
    other = ModelMap.from_model(ir.load(path))
    stats = fake_stats(llama_map)
    stats.channel = np.ones(other.hidden_size + 1)
    with pytest.raises(PanguLightError, match="statistics are for another graph"):
        make_plan(other, stats, Targets(hidden=8))


def test_same_statistics_same_plan(llama_map):
    a = make_plan(llama_map, fake_stats(llama_map, seed=3), Targets(params=0.5, drop_layers=1))
    b = make_plan(llama_map, fake_stats(llama_map, seed=3), Targets(params=0.5, drop_layers=1))
    assert a.dumps() == b.dumps()


def _shape_of(plan: PrunePlan):
    return Shape(
        hidden=len(plan.hidden),
        heads_per_group=[len(l.heads) // len(l.kv_groups) for l in plan.layers],
        kv_groups=[len(l.kv_groups) for l in plan.layers],
        ffn=[len(l.ffn) for l in plan.layers],
        dropped=set(plan.drop_layers),
    )


def test_clap_chain_merges_into_the_kept_layer_before(llama_map):
    stats = fake_stats(llama_map)
    stats.block_influence = np.array([0.9, 0.8, 0.1, 0.2])  # layers 2 and 3 (the last) go, both into 1
    stats.heads[1] = np.array([1.0, 1.0, 2.0, 2.0])
    stats.heads[2] = np.array([3.0, 3.0, 0.5, 0.5])
    stats.heads[3] = np.array([0.1, 0.1, 4.0, 4.0])
    plan = make_plan(llama_map, stats, Targets(drop_layers=2, clap=True))
    assert [(m.removed, m.into) for m in plan.clap_merges] == [(2, 1), (3, 1)]
    assert all(m.groups == [(2, 0), (3, 1)] for m in plan.clap_merges)


def _two_layer_stats(llama_map):
    stats = fake_stats(llama_map)
    stats.block_influence = np.array([0.9, 0.8, 0.1, 0.7])  # layer 2 merges into layer 1
    stats.heads[1] = np.array([2.0, 2.0, 4.0, 4.0])
    stats.heads[2] = np.array([5.0, 5.0, 1.0, 1.0])  # group 0 beats layer 1's group 0, not by 3x
    return stats


@pytest.mark.parametrize(
    "groups, expected",
    [
        ("keep", [(1, 1), (2, 0)]), ("sum", [(1, 0), (1, 1), (2, 0), (2, 1)]),
        (1, [(2, 0)]), (3, [(1, 0), (1, 1), (2, 0)]),
    ],
)
def test_clap_groups_sets_the_merged_size(llama_map, groups, expected):
    import dataclasses

    plan = make_plan(llama_map, _two_layer_stats(llama_map), Targets(drop_layers=1, clap=True, clap_groups=groups))
    (merge,) = plan.clap_merges
    assert merge.groups == expected
    assert plan.estimate["kv_groups"] == (2 if len(expected) == 2 else [2, len(expected), 2])  # layers 0, 1, 3
    assert plan.estimate["parameters_after"] == count_parameters(
        llama_map, dataclasses.replace(_shape_of(plan), kv_groups=[2, len(expected), 2, 2])
    )


def test_clap_margin_keeps_own_groups_unless_clearly_outranked(llama_map):
    stats = _two_layer_stats(llama_map)
    assert make_plan(llama_map, stats, Targets(drop_layers=1, clap=True, clap_margin=1.2)).clap_merges[0].groups == [
        (1, 1), (2, 0)
    ]  # 5 > 1.2 * 2
    assert make_plan(llama_map, stats, Targets(drop_layers=1, clap=True, clap_margin=3.0)).clap_merges[0].groups == [
        (1, 0), (1, 1)
    ]  # 5 < 3 * 2


def test_clap_adjacent_merges_only_the_next_layer(llama_map):
    stats = fake_stats(llama_map)
    stats.block_influence = np.array([0.9, 0.8, 0.1, 0.2])
    stats.heads[3] = np.array([9.0, 9.0, 9.0, 9.0])
    plan = make_plan(llama_map, stats, Targets(drop_layers=2, clap=True, clap_adjacent=True))
    assert [(m.removed, m.into) for m in plan.clap_merges] == [(2, 1)]
    assert all(layer in (1, 2) for layer, _ in plan.clap_merges[0].groups)


def test_clap_candidates_are_the_surviving_groups_and_heads(llama_map):
    stats = fake_stats(llama_map)
    stats.block_influence = np.array([0.9, 0.8, 0.1, 0.7])
    stats.heads[1] = np.array([3.0, 3.0, 1.0, 1.0])
    stats.heads[2] = np.array([0.0, 10.0, 2.0, 2.5])  # group 0 keeps head 1 (10); group 1 loses to it
    plan = make_plan(llama_map, stats, Targets(drop_layers=1, kv_groups=1, heads_per_group=1, clap=True))
    assert plan.layers[2].kv_groups == [0] and plan.layers[2].heads == [1]
    # Pool: layer 1 group 0 (head 0: 3.0), layer 2 group 0 (head 1: 10.0); K = 1.
    assert plan.clap_merges[0].groups == [(2, 0)]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_clap_merges_only_layers_of_the_receivers_type(exported_graph, family):
    """Gemma2 layers 1/2 are global/sliding, Gemma3 sliding/global: layer 2 is removed plainly."""
    _, path = exported_graph(family)
    model_map = ModelMap.from_model(ir.load(path))
    stats = fake_stats(model_map)
    stats.block_influence = np.array([0.9, 0.8, 0.1, 0.7])
    stats.heads[2] = np.full(4, 100.0)
    plan = make_plan(model_map, stats, Targets(drop_layers=1, clap=True))
    assert plan.clap and plan.clap_merges == []
    # Layers 2 and 3 removed: 3 is of layer 1's type in both models and merges; 2 does not.
    stats.block_influence = np.array([0.9, 0.8, 0.1, 0.2])
    stats.heads[3] = np.full(4, 100.0)
    plan = make_plan(model_map, stats, Targets(drop_layers=2, clap=True))
    assert [(m.removed, m.into, m.groups) for m in plan.clap_merges] == [(3, 1, [(3, 0), (3, 1)])]


def test_clap_heads_per_group_must_agree(llama_map):
    stats = _two_layer_stats(llama_map)
    plan = make_plan(llama_map, stats, Targets(drop_layers=1, heads_per_group=[2, 1, 2, 2], clap=True))
    assert plan.clap_merges == []  # layer 2 keeps 2 heads per group, layer 1 keeps 1


@pytest.mark.parametrize(
    "targets, message",
    [
        (Targets(drop_layers=1, clap=True, clap_groups="all"), "CLAP groups='all'"),
        (Targets(drop_layers=1, clap=True, clap_groups=0), "CLAP groups=0"),
        (Targets(drop_layers=1, clap=True, clap_margin=0.0), "CLAP margin=0.0"),
    ],
)
def test_clap_bad_options_are_clear_errors(llama_map, targets, message):
    with pytest.raises(PanguLightError, match=message):
        make_plan(llama_map, fake_stats(llama_map), targets)


@pytest.mark.parametrize(
    "targets, refit, probe, spread",
    [
        (Targets(params=0.8), True, True, "sensitivity"),
        (Targets(params=0.8, drop_layers=2, clap=True, align=32), True, True, "sensitivity"),
        (Targets(params=0.8), False, True, "hidden-light"),  # no Grams: --refit none/bias
        (Targets(params=0.8), True, False, "hidden-light"),  # no probe: plan
        (Targets(params=0.8, uniform=True), True, True, "hidden-light"),
        (Targets(params=0.8, heads_per_group=2), True, True, "hidden-light"),
        (Targets(params=0.8, ffn=40), True, True, "hidden-light"),
        (Targets(params=0.8, kv_groups=1), True, True, "hidden-light"),
        (Targets(params=0.8, absorb_post_norms=True), True, True, "hidden-light"),
        (Targets(hidden=32), True, True, "hidden-light"),  # no budget to spread
    ],
)
def test_auto_spread_is_sensitivity_where_it_applies(targets, refit, probe, spread):
    assert resolve_spread("auto", targets, refit=refit, probe=probe) == spread
    for name in SPREADS:  # a named spread is kept as it is
        assert resolve_spread(name, targets, refit=refit, probe=probe) == name
