"""Refit-aware selection (calib.obs): each removal's cost is the rise of the refit's error, the
elimination sees correlated inputs, GQA groups stay regular, and the planner keeps its widths."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.gram import GramStats
from pangu_light.calib.obs import elimination_order, obs_ffn_neurons, obs_query_heads
from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.refit import refit_projection
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from tests.calib.test_planner import fake_stats


def correlated_inputs(tokens: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(tokens, width)) @ rng.normal(size=(width, width))


def refit_error(inputs: np.ndarray, weight: np.ndarray, kept: list[int]) -> float:
    """sum_t ||x_K W' - x W||^2 after numpy's own least squares (no ridge)."""
    solution, *_ = np.linalg.lstsq(inputs[:, kept], inputs @ weight, rcond=None)
    return float(np.sum(np.square(inputs[:, kept] @ solution - inputs @ weight)))


@pytest.mark.parametrize("block", [1, 3])
def test_each_cost_is_the_rise_of_the_refit_error(block):
    inputs = correlated_inputs(300, 12)
    weight = np.random.default_rng(1).normal(size=(12, 5))
    order, costs = elimination_order(inputs.T @ inputs, weight, 3 if block == 3 else 7, block=block, ridge=0.0)
    kept, error = list(range(12)), 0.0
    for removed, cost in zip(order, costs):
        kept = [i for i in kept if i // block != removed]
        after = refit_error(inputs, weight, kept)
        assert cost == pytest.approx(after - error, rel=1e-7, abs=1e-9 * after)
        error = after
    assert len({i // block for i in kept}) == 12 // block - len(order)


def test_each_step_takes_the_cheapest_block():
    inputs = correlated_inputs(300, 10, seed=8)
    weight = np.random.default_rng(9).normal(size=(10, 3))
    order, _ = elimination_order(inputs.T @ inputs, weight, 4, ridge=0.0)
    kept = list(range(10))
    for removed in order.tolist():
        rises = {i: refit_error(inputs, weight, [k for k in kept if k != i]) for i in kept}
        assert removed == min(rises, key=rises.get)
        kept.remove(removed)


def test_the_elimination_removes_an_input_that_others_can_stand_in_for():
    """x1 = x0 (a duplicate) and a small independent x2: ranked by size (S_ffn-like |w| * ||x||),
    x2 goes first; the refit can move x1's weight onto x0 at no cost, so the elimination removes
    one of the duplicates."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 2))
    inputs = np.stack([base[:, 0], base[:, 0], 0.3 * base[:, 1]], axis=1)
    weight = np.array([[1.0], [1.0], [1.0]])
    sizes = np.linalg.norm(inputs, axis=0) * np.abs(weight[:, 0])
    assert int(np.argmin(sizes)) == 2
    order, costs = elimination_order(inputs.T @ inputs, weight, 1)
    assert int(order[0]) in (0, 1)
    assert costs[0] < 1e-3 * refit_error(inputs, weight, [0, 1])


def test_groups_keep_their_count():
    inputs = correlated_inputs(400, 18, seed=2)
    weight = np.random.default_rng(3).normal(size=(18, 4))
    groups = np.array([0, 0, 0, 1, 1, 1])  # 6 heads of 3 inputs, 2 groups of 3 heads
    order, _ = elimination_order(inputs.T @ inputs, weight, 4, block=3, groups=groups, keep_per_group=1)
    removed_per_group = np.bincount(groups[order], minlength=2)
    assert removed_per_group.tolist() == [2, 2]
    with pytest.raises(PanguLightError, match="cannot remove 5 of 6 blocks keeping 1 per group"):
        elimination_order(inputs.T @ inputs, weight, 5, block=3, groups=groups, keep_per_group=1)


def test_query_heads_are_chosen_inside_the_kept_groups():
    inputs = correlated_inputs(500, 16, seed=4)  # 8 heads of d = 2: 4 groups of 2
    weight = np.random.default_rng(5).normal(size=(16, 6))
    heads = obs_query_heads(inputs.T @ inputs, weight, 2, 2, [1, 3], 1)
    assert len(heads) == 2 and heads[0] in (2, 3) and heads[1] in (6, 7)
    # the same as the elimination over those groups' inputs alone
    inputs_kept = inputs[:, [4, 5, 6, 7, 12, 13, 14, 15]]
    order, _ = elimination_order(inputs_kept.T @ inputs_kept, weight[[4, 5, 6, 7, 12, 13, 14, 15]], 2, block=2,
                                 groups=np.array([0, 0, 1, 1]), keep_per_group=1)
    assert heads == [h for h in (2, 3, 6, 7) if (2, 3, 6, 7).index(h) not in order.tolist()]


def test_ffn_neurons_minimise_the_refit_error_better_than_their_sizes():
    inputs = np.abs(correlated_inputs(600, 24, seed=6))
    weight = np.random.default_rng(7).normal(size=(24, 8))
    kept = obs_ffn_neurons(inputs.T @ inputs, weight, 12)
    by_size = sorted(np.argsort(-np.linalg.norm(inputs, axis=0) * np.linalg.norm(weight, axis=1))[:12].tolist())
    assert len(kept) == 12
    assert refit_error(inputs, weight, kept) < refit_error(inputs, weight, by_size)
    fit = refit_projection(inputs.T @ inputs, inputs.sum(0), 600, kept, weight, ridge=0.0)
    assert np.sum(np.square(inputs[:, kept] @ fit.weight - inputs @ weight)) == pytest.approx(
        refit_error(inputs, weight, kept), rel=1e-8)


@pytest.fixture
def llama_map(exported_graph):
    _, path = exported_graph("llama")
    return ModelMap.from_model(ir.load(path))


def random_grams(model_map: ModelMap) -> GramStats:
    rng = np.random.default_rng(0)

    def gram(width: int) -> np.ndarray:
        x = rng.normal(size=(4 * width, width))
        return x.T @ x

    layers = model_map.layers
    return GramStats(
        gram={"o": [gram(l.attention.num_heads * l.attention.head_dim) for l in layers],
              "down": [gram(l.ffn.intermediate_size) for l in layers]},
        sum={"o": [np.zeros(l.attention.num_heads * l.attention.head_dim) for l in layers],
             "down": [np.zeros(l.ffn.intermediate_size) for l in layers]},
        tokens=100,
    )


@pytest.mark.parametrize("selection", ["obs", "obs-ffn", "obs-heads"])
def test_the_planner_keeps_its_widths_and_changes_only_who_fills_them(llama_map, selection):
    stats, grams = fake_stats(llama_map), random_grams(llama_map)
    by_scores = make_plan(llama_map, stats, Targets(params=0.7))
    by_obs = make_plan(llama_map, stats, Targets(params=0.7, selection=selection), grams=grams)
    assert by_obs.estimate == by_scores.estimate
    changed = {"heads": False, "ffn": False}
    for layer, a, b in zip(llama_map.layers, by_scores.layers, by_obs.layers):
        assert a.kv_groups == b.kv_groups and len(a.heads) == len(b.heads) and len(a.ffn) == len(b.ffn)
        rep = layer.attention.num_heads // layer.attention.num_kv_heads
        assert sorted({h // rep for h in b.heads}) == b.kv_groups
        o_weight = layer.attention.o.matmul_weight()
        if selection != "obs-ffn" and len(a.heads) < layer.attention.num_heads:
            assert b.heads == obs_query_heads(grams.gram["o"][layer.index], o_weight, layer.attention.head_dim, rep,
                                              b.kv_groups, len(b.heads) // len(b.kv_groups))
        changed["heads"] |= a.heads != b.heads
        changed["ffn"] |= a.ffn != b.ffn
    assert changed == {"heads": selection != "obs-ffn", "ffn": selection != "obs-heads"}


def test_obs_selection_needs_the_grams(llama_map):
    with pytest.raises(PanguLightError, match="needs the refit's Gram matrices"):
        make_plan(llama_map, fake_stats(llama_map), Targets(params=0.7, selection="obs"))
    with pytest.raises(PanguLightError, match="--selection 'best'"):
        Targets(selection="best").check()
