"""Rotate plans: the planner records the leading components and RMS corrections, compile runs
rotate-hidden from the plan, and the output refit composes with the rotation (refit in the rotated
basis = the unrotated refit times Q_k)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.gram import collect_grams
from pangu_light.calib.refit_plan import refit_and_set, refit_for_plan
from pangu_light.calib.rotation import collect_rotation, plan_rotation
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.rewrites.rotate_hidden import ROTATION_KEY, effective_basis, save_rotation
from pangu_light.passes.rewrites.set_projection import save_projections

from reference import left_padded_batch, max_diff_on_tokens, ort_logits

KEPT = 40


def _plan(model_map: ModelMap) -> PrunePlan:
    plan = PrunePlan.identity(model_map)
    for layer in plan.layers:
        layer.heads = [1, 2]  # one head of each KV group (2 groups of 2)
        layer.ffn = list(range(layer.index, 96, 2))
    plan.drop_layers = [1]
    return plan


def _compiled(path, plan: PrunePlan, tmp_path=None, name="c.onnx"):
    model = ir.load(path)
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    if tmp_path is not None:
        ir.save(model, tmp_path / name)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied, untied
def test_refit_in_the_rotated_basis_is_the_refit_rotated(exported_graph, family, tmp_path):
    hf_model, path = exported_graph(family)
    ids, mask = left_padded_batch(hf_model.config.vocab_size, lengths=tuple(40 - (i * 7) % 23 for i in range(12)))
    batches = [(ids.numpy(), mask.numpy())]
    grams, rotation = collect_grams(path, batches), collect_rotation(path, batches)
    save_rotation(tmp_path / "rotation.npz", rotation)
    original = ir.load(path)
    model_map = ModelMap.from_model(original)
    plan = _plan(model_map)
    plan_rotation(plan, model_map, KEPT, rotation, str(tmp_path / "rotation.npz"))
    assert plan.hidden == list(range(KEPT)) and "rotate-hidden{plan=true}" in str(plan.pipeline())
    assert "slnp" not in str(plan.pipeline()) and "slice-hidden" not in str(plan.pipeline())
    assert PrunePlan.from_json(plan.to_json()).rotation == plan.rotation
    rotated = _compiled(path, plan, tmp_path, "rotated.onnx")
    assert ModelMap.from_model(rotated).hidden_size == KEPT and ROTATION_KEY in rotated.metadata_props
    q = effective_basis(rotation.basis, model_map, KEPT)
    refits = refit_for_plan(original, rotated, grams, plan, rotation=q)
    assert len(refits.projections) == 6 and not refits.skipped

    unrotated = _plan(model_map)  # the same plan, every channel kept
    plain = refit_for_plan(original, _compiled(path, unrotated), grams, unrotated)
    for name, (weight, bias) in refits.projections.items():
        expected = q.T @ plain.projections[name][0]
        assert bias is None and weight.shape == expected.shape == tuple(rotated.graph.initializers[name].shape)
        assert np.linalg.norm(weight - expected) <= 1e-9 * np.linalg.norm(expected)

    save_projections(tmp_path / "refit.npz", refits.projections)
    run_pipeline(rotated, f'set-projection{{file="{tmp_path / "refit.npz"}"}}')
    ir.save(rotated, tmp_path / "refit.onnx")
    changed = max_diff_on_tokens(ort_logits(tmp_path / "refit.onnx", ids, mask),
                                 ort_logits(tmp_path / "rotated.onnx", ids, mask), mask)
    assert changed > 1e-3  # the refit weights are in the graph

    again = _compiled(path, plan)  # refit_and_set: the same weights from the plan and the rotation
    refit_and_set(original, again, grams, plan, rotation=rotation)
    for name in refits.projections:
        np.testing.assert_array_equal(again.graph.initializers[name].const_value.numpy(),
                                      rotated.graph.initializers[name].const_value.numpy())
    with pytest.raises(PanguLightError, match="needs the rotation it was planned with"):
        refit_and_set(original, _compiled(path, plan), grams, plan)


def test_rotation_without_cut_composes_with_the_refit(exported_graph, tmp_path):
    """Refit at full width, then rotate without a cut: the function of the refit graph, exactly."""
    hf_model, path = exported_graph("qwen3")
    ids, mask = left_padded_batch(hf_model.config.vocab_size)
    original = ir.load(path)
    plan = _plan(ModelMap.from_model(original))
    grams = collect_grams(path, [(ids.numpy(), mask.numpy())] * 4)
    compiled = _compiled(path, plan)
    save_projections(tmp_path / "refit.npz", refit_for_plan(original, compiled, grams, plan, ridge=1e-3).projections)
    run_pipeline(compiled, f'set-projection{{file="{tmp_path / "refit.npz"}"}}')
    ir.save(compiled, tmp_path / "refit.onnx")
    run_pipeline(compiled, "rotate-hidden{random_seed=4}")
    ir.save(compiled, tmp_path / "rotated.onnx")
    expected = ort_logits(tmp_path / "refit.onnx", ids, mask)
    got = ort_logits(tmp_path / "rotated.onnx", ids, mask)
    assert max_diff_on_tokens(got, expected, mask) <= 2e-4 + 3e-5 * float(np.abs(expected).max())


def test_rotate_plans_need_the_rotation(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    original = ir.load(path)
    model_map = ModelMap.from_model(original)
    plan = _plan(model_map)
    with pytest.raises(PanguLightError, match="needs a rotation"):
        plan_rotation(plan, model_map, KEPT, None, None)
    plan.hidden, plan.hidden_method, plan.rotation = list(range(KEPT)), "rotate", {"file": "x.npz"}
    grams = collect_grams(path, [tuple(t.numpy() for t in left_padded_batch(160))])
    with pytest.raises(PanguLightError, match="give the rotation"):
        refit_for_plan(original, original, grams, plan)
    _, sandwich = exported_graph("gemma3")
    with pytest.raises(PanguLightError, match="sandwich norms"):
        plan_rotation(_plan(ModelMap.from_model(ir.load(sandwich))), ModelMap.from_model(ir.load(sandwich)),
                      KEPT, object(), "x.npz")
