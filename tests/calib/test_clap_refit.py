"""CLAP receiver refit (calib.clap_refit): the probe graph equals the same probe built on the
PyTorch module (its taps and moments, and the unchanged logits), the compiled receiver reads the
probe's columns the plan keeps, and the refit solves the least squares of the PyTorch activations."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch
from test_refit import ACTIVATION_ERROR, RELATIVE, U32, relative, torch_projection_inputs

from pangu_light.calib.clap_refit import (
    ReceiverMoments,
    collect_receiver_moments,
    probe_graph,
    receiver_columns,
    refit_receiver,
)
from pangu_light.calib.gram import GramStats
from pangu_light.calib.refit_plan import refit_for_plan
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import ClapMerge, PrunePlan

from reference import left_padded_batch, max_diff_on_tokens, ort_logits, torch_logits
from reference_clap import torch_clap

# 4-layer tiny llama, 2 KV groups of 2 query heads. Layers 2 and 3 go; receiver 1 takes group 1 of
# layer 3 and group 0 of layers 1 and 2, one head per group (layer 0 untouched, so layer 1 reads the
# original input in the compiled graph too).
KV_GROUPS = [[0, 1], [0, 1], [0, 1], [1]]
HEADS = [[0, 1, 2, 3], [1, 2], [0, 2], [3]]
DROP = [2, 3]
GROUPS = [(3, 1), (1, 0), (2, 0)]
FOREIGN = [(2, 0), (3, 1)]  # the probe's foreign blocks: sorted


@pytest.fixture(scope="module")
def clap_case(exported_graph):
    hf_model, path = exported_graph("llama")
    plan = _clap_plan(path, GROUPS)
    ids, mask = left_padded_batch(hf_model.config.vocab_size, lengths=(40, 33, 27, 21, 12), seed=3)
    return hf_model, path, plan, ids, mask


def _clap_plan(path, groups) -> PrunePlan:
    plan = PrunePlan.identity(ModelMap.from_model(ir.load(path)))
    for layer_plan, kv_groups, kept in zip(plan.layers, KV_GROUPS, HEADS):
        layer_plan.kv_groups, layer_plan.heads = list(kv_groups), list(kept)
    plan.drop_layers, plan.clap = list(DROP), True
    plan.clap_merges = [ClapMerge(removed, 1, list(groups)) for removed in DROP]
    plan.validate()
    return plan


def torch_probe(hf_model, rotated: bool = False):
    """The probe done on the PyTorch module: layer 1 with all its heads and the foreign groups'
    heads, the foreign o_proj columns zero, nothing removed. ``rotated``: the foreign heads read
    layer 1's normalised input times their own layer's gamma (as a rotate plan's merge does)."""
    everything = [[0, 1]] * 4, [[0, 1, 2, 3]] * 4
    if rotated:
        source = copy.deepcopy(hf_model)
        receiver_gamma = hf_model.model.layers[1].input_layernorm.weight.detach()
        with torch.no_grad():
            for layer in {j for j, _ in FOREIGN}:
                attention = source.model.layers[layer].self_attn
                ratio = source.model.layers[layer].input_layernorm.weight / receiver_gamma
                for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
                    linear.weight.mul_(ratio[None, :])
        return _zero_foreign(torch_clap(source, *everything, [], {1: [(1, 0), (1, 1), *FOREIGN]}), hf_model)
    return _zero_foreign(torch_clap(hf_model, *everything, [], {1: [(1, 0), (1, 1), *FOREIGN]}), hf_model)


def _zero_foreign(probe, hf_model):
    with torch.no_grad():
        probe.model.layers[1].self_attn.o_proj.weight[:, 4 * hf_model.config.head_dim:] = 0.0
    return probe


def moment_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 products over n tokens plus the activations' own float32 difference (see test_refit)."""
    n = len(a)
    return n * U32 * (np.abs(a).T @ np.abs(b)) + ACTIVATION_ERROR * (
        np.abs(a).sum(0)[:, None] + np.abs(b).sum(0)[None, :])


def test_probe_keeps_the_function_and_its_moments_equal_torch(clap_case, tmp_path):
    hf_model, path, plan, ids, mask = clap_case
    probe, foreign = probe_graph(ir.load(path), plan)
    assert foreign == {1: FOREIGN}
    ir.save(probe, tmp_path / "probe.onnx")
    # The foreign columns of o_proj are zero: every residual stream, so the logits, are the original's.
    assert max_diff_on_tokens(ort_logits(tmp_path / "probe.onnx", ids, mask),
                              torch_logits(hf_model, ids, mask), mask) <= 1e-5

    moments = collect_receiver_moments(ir.load(path), plan, [(ids.numpy(), mask.numpy())])
    z = torch_projection_inputs(torch_probe(hf_model), ids, mask)[("o", 1)]
    original = torch_projection_inputs(hf_model, ids, mask)
    assert moments.tokens == int(mask.sum())
    assert np.all(np.abs(moments.gram[1] - z.T @ z) <= moment_bound(z, z))
    assert sorted(moments.cross[1]) == DROP
    for layer in DROP:
        u = original[("o", layer)]
        assert np.all(np.abs(moments.cross[1][layer] - z.T @ u) <= moment_bound(z, u))
    # ... and the foreign heads are not the layers' own ones (they read layer 1's input).
    head = hf_model.config.head_dim
    assert relative(z[:, 4 * head:5 * head], original[("o", 2)][:, :head]) > 1e-2


def test_rotate_plan_probe_reads_the_foreign_layers_gammas(clap_case):
    """A rotate plan folds each layer's pre-norm gamma into its own q/k/v before CLAP copies rows:
    the probe's foreign heads then read gamma_j (the tiny models' gammas are random), as the same
    edit on the PyTorch module does; without the scaling they would not."""
    hf_model, path, plan, ids, mask = clap_case
    rotated = copy.deepcopy(plan)
    rotated.hidden_method, rotated.hidden = "rotate", list(range(plan.hidden_size - 8))
    moments = collect_receiver_moments(ir.load(path), rotated, [(ids.numpy(), mask.numpy())])
    z = torch_projection_inputs(torch_probe(hf_model, rotated=True), ids, mask)[("o", 1)]
    assert np.all(np.abs(moments.gram[1] - z.T @ z) <= moment_bound(z, z))
    unscaled = torch_projection_inputs(torch_probe(hf_model), ids, mask)[("o", 1)]
    assert not np.all(np.abs(moments.gram[1] - unscaled.T @ unscaled) <= moment_bound(unscaled, unscaled))


def test_compiled_receiver_reads_the_probe_columns_the_plan_keeps(clap_case):
    hf_model, _, plan, ids, mask = clap_case
    z = torch_projection_inputs(torch_probe(hf_model), ids, mask)[("o", 1)]
    merged = torch_clap(hf_model, KV_GROUPS, HEADS, DROP, {1: GROUPS})
    x = torch_projection_inputs(merged, ids, mask)[("o", 1)]
    columns = receiver_columns(plan, 1, FOREIGN, hf_model.config.head_dim)
    assert x.shape[1] == len(columns) == len(GROUPS) * hf_model.config.head_dim
    assert np.allclose(x, z[:, columns], rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("target", ["own", "next", "span"])
@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_refit_solves_the_least_squares_of_the_torch_activations(clap_case, target, ridge):
    hf_model, _, plan, ids, mask = clap_case
    z = torch_projection_inputs(torch_probe(hf_model), ids, mask)[("o", 1)]
    original = torch_projection_inputs(hf_model, ids, mask)
    weights = {i: hf_model.model.layers[i].self_attn.o_proj.weight.detach().numpy().T.astype(np.float64)
               for i in (1, *DROP)}
    moments = ReceiverMoments({1: z.T @ z}, {1: {j: z.T @ original[("o", j)] for j in DROP}}, {1: FOREIGN}, len(z))
    fit = refit_receiver(moments, plan, 1, weights, hf_model.config.head_dim, target=target, ridge=ridge)

    layers = {"own": (1,), "next": (1, 2), "span": (1, *DROP)}[target]  # layer 2 is next to the receiver
    wanted = sum(original[("o", i)] @ weights[i] for i in layers)
    design = z[:, receiver_columns(plan, 1, FOREIGN, hf_model.config.head_dim)]
    penalty = np.sqrt(ridge * np.mean(np.diag(design.T @ design))) * np.eye(design.shape[1])
    solution = np.linalg.lstsq(np.vstack([design, penalty]),
                               np.vstack([wanted, np.zeros((design.shape[1], wanted.shape[1]))]), rcond=None)[0]
    assert relative(fit, solution) <= RELATIVE
    # The fit is not the copied columns CLAP starts from.
    head = hf_model.config.head_dim
    copied = np.concatenate([weights[layer][h * head:(h + 1) * head] for layer, group in GROUPS
                             for h in HEADS[layer] if h // 2 == group])
    assert relative(fit, copied) > 1e-2


def test_refit_for_plan_sets_the_receiver_and_the_rest_as_before(clap_case, tmp_path):
    hf_model, path, plan, ids, mask = clap_case
    grams = _grams(path, ids, mask)
    plain = refit_for_plan(ir.load(path), _compiled(path, plan), grams, plan)
    assert any("CLAP" in why or "values were changed" in why for why in plain.skipped)
    moments = collect_receiver_moments(ir.load(path), plan, [(ids.numpy(), mask.numpy())])
    with_receiver = refit_for_plan(ir.load(path), _compiled(path, plan), grams, plan, receivers=moments,
                                   receiver_target="span")
    assert "layer 1: o (CLAP receiver, target span)" in with_receiver.refit
    assert not [why for why in with_receiver.skipped if "o_proj" in why]
    name = next(n for n in with_receiver.projections if n not in plain.projections)
    weights = {i: hf_model.model.layers[i].self_attn.o_proj.weight.detach().numpy().T.astype(np.float64)
               for i in (1, *DROP)}
    expected = refit_receiver(moments, plan, 1, weights, hf_model.config.head_dim, target="span")
    assert np.array_equal(with_receiver.projections[name][0], expected.T)
    for other, projection in plain.projections.items():  # the other projections do not change
        assert np.array_equal(with_receiver.projections[other][0], projection[0])


def test_sandwich_receivers_fit_their_own_output(exported_graph):
    """Gemma2's post-norm reads each layer's raw o_proj output, so another layer's is no target:
    the receiver fits its own whatever target was asked for."""
    hf_model, path = exported_graph("gemma2")  # layers 1 and 3 are of one attention type
    plan = _clap_plan(path, [(3, 1), (1, 0)])
    ids, mask = left_padded_batch(hf_model.config.vocab_size, lengths=(40, 33, 27, 21, 12), seed=3)
    moments = collect_receiver_moments(ir.load(path), plan, [(ids.numpy(), mask.numpy())])
    fits = refit_for_plan(ir.load(path), _compiled(path, plan), _grams(path, ids, mask), plan, receivers=moments,
                          receiver_target="span")
    assert "layer 1: o (CLAP receiver, target own)" in fits.refit
    weights = {i: hf_model.model.layers[i].self_attn.o_proj.weight.detach().numpy().T.astype(np.float64)
               for i in (1, *DROP)}
    own = refit_receiver(moments, plan, 1, weights, hf_model.config.head_dim, target="own")
    (name,) = [n for n in fits.projections if ".1.self_attn.o_proj" in n]
    assert np.array_equal(fits.projections[name][0], own.T)


def _compiled(path, plan) -> ir.Model:
    model = ir.load(path)
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    return model


def _grams(path, ids, mask) -> GramStats:
    from pangu_light.calib.gram import collect_grams

    return collect_grams(path, [(ids.numpy(), mask.numpy())])
