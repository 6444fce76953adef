"""Corrective refit: the cross moments equal the PyTorch activations of the original and the pruned
model (re-imported from the pruned graph) on the same tokens, the weights solve the least squares
on those activations, and with nothing pruned the original weights come back."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from test_refit import ACTIVATION_ERROR, RELATIVE, U32, padded_batch, relative, torch_projection_inputs

from pangu_light.calib.corrective_refit import collect_cross_moments, corrective_projections, layer_targets
from pangu_light.core.records import layer_origins
from pangu_light.frontend.reimport import reimport
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import ClapMerge, PrunePlan

HIDDEN_KEPT = 40


def _pruned(path, tmp_path):
    """Two of four query heads, half the FFN, layer 1 dropped, the hidden size cut to 40 channels."""
    model = ir.load(path)
    plan = PrunePlan.identity(ModelMap.from_model(model))
    for layer in plan.layers:
        layer.heads = [1, 2]
        layer.ffn = list(range(layer.index, 96, 2))
    plan.drop_layers = [1]
    plan.hidden = list(range(3, 3 + HIDDEN_KEPT))
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    ir.save(model, tmp_path / "pruned.onnx")
    return plan, tmp_path / "pruned.onnx"


def _weights(model) -> dict[tuple[str, int], np.ndarray]:
    """(projection, layer) -> weight [in, out] float64 of a PyTorch model."""
    result = {}
    for index, layer in enumerate(model.model.layers):
        result[("o", index)] = layer.self_attn.o_proj.weight.detach().numpy().T.astype(np.float64)
        result[("down", index)] = layer.mlp.down_proj.weight.detach().numpy().T.astype(np.float64)
    return result


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_corrective_refit_solves_the_least_squares_of_the_torch_activations(exported_graph, tmp_path, ridge):
    hf_model, path = exported_graph("llama")
    ids, mask = padded_batch(hf_model.config.vocab_size)
    plan, pruned_path = _pruned(path, tmp_path)
    pruned = ir.load(pruned_path)
    origins = layer_origins(pruned.metadata_props)
    assert origins == [0, 2, 3]
    targets = layer_targets(origins, dropped=True)  # layer 0's down_proj also stands for layer 1
    assert targets[("down", 0)] == [("down", 0), ("o", 1), ("down", 1)]
    moments = collect_cross_moments(ir.load(path), ir.load(pruned_path), targets, [(ids.numpy(), mask.numpy())])

    before = torch_projection_inputs(hf_model, ids, mask)
    student = reimport(pruned_path).model
    after = torch_projection_inputs(student, ids, mask)
    for (proj, index), x_new in after.items():
        # As the Gram test: float32 accumulation over n tokens plus the activations' own ORT error.
        n = len(x_new)
        pairs = [(moments.gram[(proj, index)], x_new)]
        pairs += [(moments.cross[(proj, index, source)], before[source]) for source in targets[(proj, index)]]
        for got, right in pairs:
            left = x_new
            magnitude = np.abs(left).T @ np.abs(right)
            bound = n * U32 * magnitude + ACTIVATION_ERROR * (
                np.abs(left).sum(0)[:, None] + np.abs(right).sum(0)[None, :])
            assert np.all(np.abs(got - left.T @ right) <= bound), (proj, index)

    select = np.zeros((hf_model.config.hidden_size, HIDDEN_KEPT))
    select[plan.hidden, np.arange(HIDDEN_KEPT)] = 1.0
    model_map = ModelMap.from_model(pruned)
    names = {linear.weight.name for layer in model_map.layers for linear in (layer.attention.o, layer.ffn.down)}
    projections = corrective_projections(ir.load(path), pruned, moments, select, names, ridge=ridge)
    assert len(projections) == 6
    original_weights, pruned_weights = _weights(hf_model), _weights(student)
    for index, layer in enumerate(model_map.layers):
        for proj, linear in (("o", layer.attention.o), ("down", layer.ffn.down)):
            x_new = after[(proj, index)]
            target = sum(before[source] @ original_weights[source] for source in targets[(proj, index)]) @ select
            # The penalty pulls toward the graph's own weights W': stacked [X'; sqrt(l) I] W = [Y; sqrt(l) W'].
            current = pruned_weights[(proj, index)]
            root = np.sqrt(ridge * np.mean(np.sum(x_new * x_new, axis=0)))
            best = np.linalg.lstsq(np.vstack([x_new, root * np.eye(x_new.shape[1])]),
                                   np.vstack([target, root * current]), rcond=None)[0]
            ours = projections[linear.weight.name][0].T

            def residual(weight):
                fit, pull = np.linalg.norm(x_new @ weight - target), root * np.linalg.norm(weight - current)
                return float(fit**2 + pull**2)

            # First order in the weights' error: the objective at our solution is the optimum's
            # to well within the activations' float32 error; the pruned graph's own weights (the
            # plain slice) are far from it, so a wrong target or origin fails.
            assert residual(ours) <= residual(best) * (1 + 1e-4) + 1e-12, (proj, index)
            assert residual(pruned_weights[(proj, index)]) > residual(best) * 1.01, (proj, index)


def test_nothing_pruned_and_no_ridge_gives_the_original_weights(exported_graph):
    hf_model, path = exported_graph("llama")
    ids, mask = padded_batch(hf_model.config.vocab_size)
    model = ir.load(path)
    model_map = ModelMap.from_model(model)
    origins = list(range(len(model_map.layers)))
    moments = collect_cross_moments(ir.load(path), ir.load(path), layer_targets(origins),
                                    [(ids.numpy(), mask.numpy())])
    names = {layer.ffn.down.weight.name for layer in model_map.layers} | {model_map.layers[0].attention.o.weight.name}
    projections = corrective_projections(model, ir.load(path), moments,
                                         np.eye(hf_model.config.hidden_size), names, ridge=0.0)
    assert set(projections) == names
    for index, layer in enumerate(model_map.layers):
        for linear in (layer.attention.o, layer.ffn.down):
            if linear.weight.name in names:
                assert relative(projections[linear.weight.name][0], linear.weight.const_value.numpy()) <= RELATIVE


def test_targets_of_removed_and_merged_layers():
    merge = ClapMerge(removed=2, into=1, groups=[(1, 0), (2, 1)])
    origins = [0, 1, 4]  # layers 2 and 3 removed; 2's attention merged into 1
    assert layer_targets(origins) == {
        ("o", 0): [("o", 0)], ("down", 0): [("down", 0)], ("o", 1): [("o", 1)], ("down", 1): [("down", 1)],
        ("o", 2): [("o", 4)], ("down", 2): [("down", 4)],
    }
    targets = layer_targets(origins, [merge], dropped=True)
    assert targets[("o", 1)] == [("o", 1), ("o", 2)]
    assert targets[("down", 1)] == [("down", 1), ("down", 2), ("o", 3), ("down", 3)]
    assert targets[("down", 0)] == [("down", 0)] and targets[("down", 2)] == [("down", 4)]
