"""The sensitivity spread: refit costs from one factorisation, budgets met, widths moved to where
they cost least."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.budget import resolve_shape
from pangu_light.calib.gram import collect_grams
from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.sensitivity import _layer_costs, prefix_residuals
from pangu_light.calib.stats import calibrate
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import count_parameters, shape_of

from reference import left_padded_batch


def test_prefix_residuals_equal_least_squares():
    """R(f) is the mean squared error of the least-squares fit of X W from the first f inputs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))  # correlated inputs
    w = rng.normal(size=(20, 7))
    order = rng.permutation(20)
    got = prefix_residuals(x.T @ x, len(x), order, w, ridge=0.0)
    target = x @ w
    for f in range(21):
        kept = x[:, order[:f]]
        fit = np.linalg.lstsq(kept, target, rcond=None)[0] if f else np.zeros((0, 7))
        expected = np.square(target - kept @ fit).sum() / len(x)
        assert abs(got[f] - expected) <= 1e-9 * got[0], f
    assert got[-1] <= 1e-9 * got[0]


@pytest.fixture(scope="module")
def llama_calibrated(exported_graph):
    hf_model, path = exported_graph("llama")
    vocab = hf_model.config.vocab_size
    batches = [(ids.numpy(), mask.numpy()) for ids, mask in
               (left_padded_batch(vocab, lengths=(40, 33, 40, 25), seed=s) for s in range(6))]
    model_map = ModelMap.from_model(ir.load(path))
    return model_map, calibrate(path, batches), collect_grams(path, batches)


def total_cost(model_map, stats, grams, shape) -> float:
    costs = [_layer_costs(model_map, stats, grams, l.index) for l in model_map.layers]
    return sum(c.heads[shape.heads_per_group[i]] + c.ffn[shape.ffn[i]] for i, c in enumerate(costs))


@pytest.mark.parametrize("budget", [0.9, 0.7])
def test_sensitivity_spread_meets_the_budget_at_lower_cost(llama_calibrated, budget):
    model_map, stats, grams = llama_calibrated
    plan = make_plan(model_map, stats, Targets(params=budget, spread="sensitivity"), grams=grams)
    light = make_plan(model_map, stats, Targets(params=budget))  # the default, hidden-light
    before = count_parameters(model_map, shape_of(model_map))
    assert abs(plan.estimate["parameters_after"] / before - budget) <= 0.01
    assert plan.estimate["hidden"] == light.estimate["hidden"]  # the hidden size is hidden-light's
    shape = resolve_shape(model_map, Targets(params=budget, spread="sensitivity"), set())
    spread = dataclasses.replace(shape, heads_per_group=[len(l.heads) // len(l.kv_groups) for l in plan.layers],
                                 ffn=[len(l.ffn) for l in plan.layers])
    default = dataclasses.replace(shape, heads_per_group=[len(l.heads) // len(l.kv_groups) for l in light.layers],
                                  ffn=[len(l.ffn) for l in light.layers])
    assert count_parameters(model_map, spread) <= count_parameters(model_map, default) * 1.01
    assert total_cost(model_map, stats, grams, spread) < total_cost(model_map, stats, grams, default)
    for layer_plan, layer in zip(plan.layers, model_map.layers):  # the planner's own ranking inside a layer
        assert layer_plan.ffn == sorted(np.argsort(-stats.ffn[layer.index], kind="stable")[: len(layer_plan.ffn)])


def test_a_layer_that_changes_nothing_is_cut_first(llama_calibrated):
    """Block Influence 0 (the layer's output equals its input): its heads and neurons cost nothing."""
    model_map, stats, grams = llama_calibrated
    quiet = dataclasses.replace(stats, block_influence=np.where(np.arange(len(model_map.layers)) == 1, 0.0,
                                                                 np.maximum(stats.block_influence, 1e-3)))
    plan = make_plan(model_map, quiet, Targets(params=0.75, spread="sensitivity"), grams=grams)
    layer = model_map.layer(1)
    assert len(plan.layers[1].heads) == layer.attention.num_kv_heads  # one head per group
    assert len(plan.layers[1].ffn) == layer.ffn.intermediate_size // 4  # the floor
    others = [len(p.ffn) for i, p in enumerate(plan.layers) if i != 1]
    assert min(others) > len(plan.layers[1].ffn)


def test_sensitivity_refusals(llama_calibrated):
    model_map, stats, grams = llama_calibrated
    with pytest.raises(PanguLightError, match="needs the refit's Gram statistics"):
        make_plan(model_map, stats, Targets(params=0.8, spread="sensitivity"))
    with pytest.raises(PanguLightError, match="give --params, and neither --uniform"):
        make_plan(model_map, stats, Targets(params=0.8, ffn=50, spread="sensitivity"), grams=grams)
    with pytest.raises(PanguLightError, match="give --params"):
        make_plan(model_map, stats, Targets(hidden=32, spread="sensitivity"), grams=grams)
