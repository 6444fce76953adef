"""The sensitivity spread: refit errors from one factorisation, the layer probe against the same edit
in torch, budgets met, widths moved to where they cost least."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.budget import BUDGET_TOLERANCE, resolve_shape
from pangu_light.calib.gram import collect_grams
from pangu_light.calib.planner import Targets, make_plan
from pangu_light.calib.refit import refit_projection
from pangu_light.calib.sensitivity import _layer_costs, head_order, prefix_residuals, sensitivity_shape
from pangu_light.calib.sensitivity_probe import LayerScales, probe_layers, probe_widths
from pangu_light.calib.stats import calibrate
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.analysis.parameters import count_parameters, shape_of

from reference import left_padded_batch
from reference_sensitivity import unaligned_sensitivity_shape


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
    stats, grams = calibrate(path, batches), collect_grams(path, batches)
    probe_ids = np.random.default_rng(3).integers(3, vocab, size=(4, 24))
    return model_map, stats, grams, probe_layers(path, stats, grams, probe_ids, batch_size=3), probe_ids, hf_model


def test_probe_equals_the_same_edit_in_torch(llama_calibrated):
    """Each probe's loss rise equals the torch model's with that layer's projection refit over the
    probe's kept inputs and the removed inputs' rows zeroed (a removal)."""
    import torch

    model_map, stats, grams, scales, ids, hf_model = llama_calibrated

    def torch_loss() -> float:
        with torch.no_grad():
            return float(hf_model(torch.tensor(ids), labels=torch.tensor(ids)).loss)

    base = torch_loss()
    # float32 ORT vs torch on the unpruned model, and a few float32 roundings of the loss itself
    bound = 4 * abs(base - scales.base_loss) + 8 * float(np.finfo(np.float32).eps) * base
    for index, layer in enumerate(hf_model.model.layers):
        heads_kept, ffn_kept = probe_widths(model_map, index)
        attention = model_map.layer(index).attention
        for proj, module, order, kept in (
            ("o", layer.self_attn.o_proj, head_order(stats.heads[index], attention.num_kv_heads, attention.head_dim),
             heads_kept * attention.num_kv_heads * attention.head_dim),
            ("down", layer.mlp.down_proj, np.argsort(-stats.ffn[index], kind="stable"), ffn_kept),
        ):
            original = module.weight.detach().clone()
            kept_inputs = np.sort(order[:kept])
            fit = refit_projection(grams.gram[proj][index], grams.sum[proj][index], grams.tokens, kept_inputs,
                                   original.numpy().T.astype(np.float64))
            fed = np.zeros((original.shape[1], original.shape[0]))
            fed[kept_inputs] = fit.weight
            with torch.no_grad():
                module.weight.copy_(torch.tensor(fed.T, dtype=torch.float32))
            rise = torch_loss() - base
            with torch.no_grad():
                module.weight.copy_(original)
            assert abs(scales.rises[proj][index] - rise) <= bound, (proj, index)
    assert max(scales.rises["o"] + scales.rises["down"]) > 20 * bound  # probes that bite


def total_cost(model_map, stats, grams, scales, shape) -> float:
    costs = [_layer_costs(model_map, stats, grams, scales, l.index) for l in model_map.layers]
    return sum(c.heads[shape.heads_per_group[i]] + c.ffn[shape.ffn[i]] for i, c in enumerate(costs))


@pytest.mark.parametrize("budget", [0.9, 0.7])
def test_sensitivity_spread_meets_the_budget_at_lower_cost(llama_calibrated, budget):
    model_map, stats, grams, scales, *_ = llama_calibrated
    plan = make_plan(model_map, stats, Targets(params=budget, spread="sensitivity"), grams=grams,
                     layer_scales=scales)
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
    assert total_cost(model_map, stats, grams, scales, spread) < total_cost(model_map, stats, grams, scales, default)
    for layer_plan, layer in zip(plan.layers, model_map.layers):  # the planner's own ranking inside a layer
        assert layer_plan.ffn == sorted(np.argsort(-stats.ffn[layer.index], kind="stable")[: len(layer_plan.ffn)])


@pytest.mark.parametrize("align,budget", [(4, 0.9), (4, 0.7), (8, 0.9), (8, 0.8), (5, 0.9), (5, 0.7)])
def test_sensitivity_spread_honours_align(llama_calibrated, align, budget):
    """--align N: every kept FFN width a multiple of N or the layer's full width (96: 5 does not divide
    it), the budget met within the planner's tolerance, at no more cost than the aligned default.
    (8, 0.7): the aligned default itself cannot land in the budget on this model."""
    model_map, stats, grams, scales, *_ = llama_calibrated
    targets = Targets(params=budget, spread="sensitivity", align=align)
    plan = make_plan(model_map, stats, targets, grams=grams, layer_scales=scales)
    light = make_plan(model_map, stats, Targets(params=budget, align=align))
    before = count_parameters(model_map, shape_of(model_map))
    assert abs(plan.estimate["parameters_after"] - budget * before) <= BUDGET_TOLERANCE * budget * before
    assert plan.estimate["hidden"] == light.estimate["hidden"]  # resolve_shape's, aligned
    assert plan.estimate["hidden"] % align == 0 or plan.estimate["hidden"] == model_map.hidden_size
    for layer_plan, layer in zip(plan.layers, model_map.layers):
        full = layer.ffn.intermediate_size
        assert len(layer_plan.ffn) % align == 0 or len(layer_plan.ffn) == full, (layer.index, len(layer_plan.ffn))
        assert len(layer_plan.ffn) >= full // 2  # not below the probe's width
    shape = resolve_shape(model_map, targets, set())
    spread, default = (dataclasses.replace(shape, heads_per_group=[len(l.heads) // len(l.kv_groups) for l in p.layers],
                                           ffn=[len(l.ffn) for l in p.layers]) for p in (plan, light))
    assert count_parameters(model_map, spread) <= count_parameters(model_map, default) * (1 + BUDGET_TOLERANCE)
    assert total_cost(model_map, stats, grams, scales, spread) <= total_cost(model_map, stats, grams, scales, default)


@pytest.mark.parametrize("budget", [0.9, 0.8, 0.7])
def test_align_one_is_the_unaligned_spread(llama_calibrated, budget):
    """align 1 (the default) gives exactly the spread from before align (tests/reference_sensitivity.py)."""
    model_map, stats, grams, scales, *_ = llama_calibrated
    shape = resolve_shape(model_map, Targets(params=budget, spread="sensitivity"), set())
    params = budget * count_parameters(model_map, shape_of(model_map))
    expected = unaligned_sensitivity_shape(model_map, stats, grams, shape, params, scales)
    got = sensitivity_shape(model_map, stats, grams, shape, params, scales, align=1)
    assert got == expected
    plan = make_plan(model_map, stats, Targets(params=budget, spread="sensitivity"), grams=grams, layer_scales=scales)
    assert [len(l.ffn) for l in plan.layers] == expected.ffn
    assert [len(l.heads) // len(l.kv_groups) for l in plan.layers] == expected.heads_per_group


def test_a_layer_that_changes_nothing_is_cut_first(llama_calibrated):
    """A layer whose probes did not raise the loss: its heads and neurons cost nothing."""
    model_map, stats, grams, *_ = llama_calibrated
    rises = [0.0 if i == 1 else 1.0 for i in range(len(model_map.layers))]
    zeros = [0.0] * len(model_map.layers)
    quiet = LayerScales(base_loss=1.0, rises={"o": rises, "down": rises}, noise={"o": zeros, "down": zeros})
    plan = make_plan(model_map, stats, Targets(params=0.8, spread="sensitivity"), grams=grams, layer_scales=quiet)
    layer = model_map.layer(1)
    assert len(plan.layers[1].heads) == layer.attention.num_kv_heads  # one head fewer per group (of 2)
    assert len(plan.layers[1].ffn) == layer.ffn.intermediate_size // 2  # the probe's width, the floor
    others = [len(p.ffn) for i, p in enumerate(plan.layers) if i != 1]
    assert min(others) > len(plan.layers[1].ffn)


def test_sensitivity_refusals(llama_calibrated):
    model_map, stats, grams, scales, *_ = llama_calibrated
    with pytest.raises(PanguLightError, match="needs the refit's Gram statistics and the layer probe"):
        make_plan(model_map, stats, Targets(params=0.8, spread="sensitivity"))
    with pytest.raises(PanguLightError, match="give --params, and neither --uniform"):
        make_plan(model_map, stats, Targets(params=0.8, ffn=50, spread="sensitivity"), grams=grams, layer_scales=scales)
    with pytest.raises(PanguLightError, match="give --params"):
        make_plan(model_map, stats, Targets(hidden=32, spread="sensitivity"), grams=grams, layer_scales=scales)


def test_reachable_spread_is_what_the_sensitivity_spread_can_meet(llama_calibrated):
    """``sensitivity_reaches`` says where ``sensitivity_shape`` can meet a budget: over a grid of
    budgets that crosses its floors (not monotonic: the hidden size follows the budget in steps),
    make_plan plans where it says so and refuses elsewhere; there ``--spread auto`` falls back to
    hidden-light and an explicit ``--spread sensitivity`` is one clear error, both decided before
    any probe."""
    from pangu_light.calib.planner import reachable_spread, sensitivity_reaches

    model_map, stats, grams, scales, *_ = llama_calibrated
    outcomes = set()
    for ratio in np.round(np.arange(0.3, 0.8, 0.01), 3):
        targets = Targets(params=float(ratio), spread="sensitivity")
        reaches = sensitivity_reaches(model_map, stats, targets)
        outcomes.add(reaches)
        if reaches:
            make_plan(model_map, stats, targets, grams=grams, layer_scales=scales)
            assert reachable_spread(model_map, stats, targets, "auto") == "sensitivity"
            continue
        with pytest.raises(PanguLightError, match="cannot meet the budget"):
            make_plan(model_map, stats, targets, grams=grams, layer_scales=scales)
        assert reachable_spread(model_map, stats, targets, "auto") == "hidden-light"
        with pytest.raises(PanguLightError, match="--spread sensitivity cannot reach --params"):
            reachable_spread(model_map, stats, targets, "sensitivity")
        hidden_light = dataclasses.replace(targets, spread="hidden-light")
        assert reachable_spread(model_map, stats, hidden_light, "sensitivity") == "hidden-light"
    assert outcomes == {True, False}  # the grid crosses the floors
