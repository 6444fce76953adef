"""run_pipeline / run_passes with toy passes defined here, on a hand-built y = MatMul(x, W)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from pangu_light.core.contract import PASS_STATS as PASS_STATS_KEY
from pangu_light.core.contract import PIPELINE as PIPELINE_KEY
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra.base import PanguPass
from pangu_light.passes.infra.manager import run_passes, run_pipeline
from pangu_light.passes.infra.pipeline import Pipeline
from pangu_light.passes.infra.verify import verify_model

from reference import graph_bytes
from toy_passes import W_VALUES, BreakShapePass, NoOpPass, ScaleWeightPass, build_model


def run_ort(model: ir.Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


class FailingPass(PanguPass):
    name = "failing"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise PanguLightError("layer 3 has no MLP; pick another layer")


class NeedsTwoInputsPass(PanguPass):
    name = "needs-two-inputs"

    def requires(self, model: ir.Model) -> None:
        if len(model.graph.inputs) != 2:
            raise PanguLightError(f"expected 2 graph inputs, found {len(model.graph.inputs)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:  # pragma: no cover - never reached
        return ir.passes.PassResult(model, modified=False)


REGISTRY = {
    cls.name: cls for cls in (ScaleWeightPass, NoOpPass, BreakShapePass, FailingPass, NeedsTwoInputsPass)
}


def test_scale_then_noop_changes_output_tags_and_records_provenance():
    model = build_model()
    x = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(2, 4)
    before = run_ort(model, x)

    report = run_pipeline(
        model, Pipeline.parse("scale-weight{factor=2.0},no-op"), verify=True, registry=REGISTRY
    )

    assert [r.name for r in report.records] == ["scale-weight", "no-op"]
    assert [r.modified for r in report.records] == [True, False]
    assert report.records[0].stats == {"initializers_scaled": 1, "elements_scaled": 12}
    assert report.records[1].stats == {}
    assert report.modified
    np.testing.assert_allclose(model.graph.initializers["W"].const_value.numpy(), 2 * W_VALUES, rtol=0, atol=0)
    np.testing.assert_allclose(run_ort(model, x), 2 * before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run_ort(model, x), x @ (2 * W_VALUES), rtol=1e-5, atol=1e-6)
    assert model.graph.initializers["W"].metadata_props["pangu_light.pass"] == "scale-weight"
    assert "pangu_light.pass" not in model.graph.node(0).metadata_props

    assert model.metadata_props[PIPELINE_KEY] == "scale-weight{factor=2.0},no-op"
    assert json.loads(model.metadata_props[PASS_STATS_KEY]) == [
        {"pass": "scale-weight", "modified": True, "stats": {"initializers_scaled": 1, "elements_scaled": 12}},
        {"pass": "no-op", "modified": False, "stats": {}},
    ]
    table = str(report)
    assert table.splitlines()[0] == "pipeline: scale-weight{factor=2.0},no-op"
    assert "initializers_scaled=1, elements_scaled=12" in table
    assert "no-op" in table.splitlines()[-1] and " no " in table.splitlines()[-1]


def test_provenance_survives_save_and_appends_on_a_second_compile(tmp_path):
    model = build_model()
    run_pipeline(model, Pipeline.parse("scale-weight"), registry=REGISTRY)
    path = tmp_path / "once.onnx"
    ir.save(model, path)
    reloaded = ir.load(path)
    assert reloaded.metadata_props[PIPELINE_KEY] == "scale-weight"

    run_pipeline(reloaded, Pipeline.parse("scale-weight{factor=0.5},no-op"), registry=REGISTRY)
    assert reloaded.metadata_props[PIPELINE_KEY] == "scale-weight,scale-weight{factor=0.5},no-op"
    stats = json.loads(reloaded.metadata_props[PASS_STATS_KEY])
    assert [entry["pass"] for entry in stats] == ["scale-weight", "scale-weight", "no-op"]
    # Tagged twice by the same pass: recorded once. Values: 4 * 0.5 = 2x original.
    assert reloaded.graph.initializers["W"].metadata_props["pangu_light.pass"] == "scale-weight"
    np.testing.assert_array_equal(reloaded.graph.initializers["W"].const_value.numpy(), W_VALUES)


def test_noop_pass_leaves_the_graph_byte_identical():
    model = build_model()
    before = graph_bytes(model)
    report = run_pipeline(model, "no-op", verify=True, registry=REGISTRY)
    assert not report.modified
    assert graph_bytes(model) == before
    assert model.metadata_props[PIPELINE_KEY] == "no-op"


def test_verify_leaves_the_model_byte_identical_even_with_large_initializers():
    # W of 64 KiB is above the 1 KiB threshold, so verify turns it into an input and back.
    model = build_model(np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32))
    before = graph_bytes(model)
    verify_model(model, where="in a test")
    assert graph_bytes(model) == before
    assert list(model.graph.initializers) == ["W"]
    assert [v.name for v in model.graph.inputs] == ["x"]


def test_verify_catches_a_shape_mismatch_and_names_the_pass():
    model = build_model()
    with pytest.raises(PanguLightError) as info:
        run_pipeline(model, "no-op,scale-weight,break-shape", verify=True, registry=REGISTRY)
    message = str(info.value)
    assert message.startswith(
        "graph is invalid after pass break-shape (step 3 of 3, after no-op, scale-weight): shape inference:"
    )
    assert "(op_type:MatMul, node name: matmul)" in message
    assert "Incompatible dimensions for matrix multiplication" in message
    assert "\n" not in message
    # Nothing recorded for a pipeline that did not finish.
    assert PIPELINE_KEY not in model.metadata_props


def test_without_verify_the_broken_pass_goes_through():
    model = build_model()
    report = run_pipeline(model, "break-shape", registry=REGISTRY)
    assert report.records[0].modified
    with pytest.raises(PanguLightError, match="graph is invalid after the fact"):
        verify_model(model, where="after the fact")


def test_verify_rejects_a_broken_input_model_before_any_pass():
    model = build_model()
    model.graph.node(0).op_type = "NotAnOp"
    with pytest.raises(PanguLightError) as info:
        run_pipeline(model, "no-op", verify=True, registry=REGISTRY)
    message = str(info.value)
    assert message.startswith("graph is invalid in the input model, before any pass ran: ONNX checker:")
    assert "No Op registered for NotAnOp" in message
    assert message.endswith("re-export it with `pangu-light export`, or run without --verify to skip the check")


def test_a_user_error_in_a_pass_names_the_pass_and_those_before_it():
    model = build_model()
    with pytest.raises(PanguLightError) as info:
        run_pipeline(model, "scale-weight,no-op,failing", registry=REGISTRY)
    assert str(info.value) == (
        "pass failing (step 3 of 3, after scale-weight, no-op): layer 3 has no MLP; pick another layer"
    )


def test_a_failed_precondition_is_a_user_error_naming_the_pass():
    model = build_model()
    with pytest.raises(PanguLightError) as info:
        run_pipeline(model, "needs-two-inputs", registry=REGISTRY)
    assert str(info.value) == (
        "pass needs-two-inputs (step 1 of 1, the first) cannot run on this model: "
        "expected 2 graph inputs, found 1"
    )


def test_option_errors_come_before_any_pass_runs():
    model = build_model()
    message = r"pass scale-weight: unknown option 'factr'; valid options: factor \(float, default 2.0\)"
    with pytest.raises(PanguLightError, match=message):
        run_pipeline(model, "scale-weight,scale-weight{factr=3}", registry=REGISTRY)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), W_VALUES)


def test_unknown_pass_lists_the_registered_ones():
    with pytest.raises(PanguLightError) as info:
        run_pipeline(build_model(), "scale-weight,slnp", registry=REGISTRY)
    assert str(info.value) == (
        "unknown pass 'slnp'; available passes: break-shape, failing, needs-two-inputs, no-op, scale-weight"
    )


def test_after_change_is_called_only_for_passes_that_changed_the_graph():
    seen = []

    def after_change(index, name, model):
        seen.append((index, name, float(model.graph.initializers["W"].const_value.numpy()[0, 1])))

    run_pipeline(
        build_model(), "no-op,scale-weight,no-op,scale-weight{factor=3}", after_change=after_change, registry=REGISTRY
    )
    w01 = float(W_VALUES[0, 1])
    assert seen == [(1, "scale-weight", pytest.approx(2 * w01)), (3, "scale-weight", pytest.approx(6 * w01))]


def test_run_passes_with_instances_and_stats_reset_per_run():
    scale = ScaleWeightPass({"factor": 3})
    model = build_model()
    report = run_passes(model, [scale, NoOpPass()])
    assert str(report.pipeline) == "scale-weight{factor=3.0},no-op"
    assert model.metadata_props[PIPELINE_KEY] == "scale-weight{factor=3.0},no-op"
    run_passes(model, [scale])
    assert scale.stats == {"initializers_scaled": 1, "elements_scaled": 12}
    np.testing.assert_allclose(model.graph.initializers["W"].const_value.numpy(), 9 * W_VALUES, rtol=1e-6)


def test_a_bug_in_a_pass_is_a_pass_error_not_a_user_error():
    class BuggyPass(PanguPass):
        name = "buggy"

        def call(self, model):
            return {}["missing"]

    with pytest.raises(ir.passes.PassError, match=r"pass buggy \(step 2 of 2, after no-op\) failed: KeyError"):
        run_passes(build_model(), [NoOpPass(), BuggyPass()])


def test_verify_is_not_fooled_by_a_stale_output_shape():
    # The pass changes W to [4, 5] but leaves y declared [2, 3]: strict inference must object.
    class WidenPass(PanguPass):
        name = "widen"

        def call(self, model):
            value = model.graph.initializers["W"]
            value.const_value = ir.tensor(np.ones((4, 5), np.float32), name="W")
            value.shape = ir.Shape([4, 5])
            return ir.passes.PassResult(model, modified=True)

    with pytest.raises(PanguLightError) as info:
        run_passes(build_model(), [WidenPass()], verify=True)
    message = str(info.value)
    assert message.startswith("graph is invalid after pass widen (step 1 of 1, the first): shape inference:")
    assert "differ in dimension 1: (5) vs (3)" in message
    assert message.endswith("this is a bug in that pass: please report it with the pipeline text")


def test_onnx_checker_accepts_the_toy_model():
    onnx.checker.check_model(ir.serde.serialize_model(build_model()), full_check=True)
