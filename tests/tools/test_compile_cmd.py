"""`pangu-light compile` end to end on a hand-built MatMul graph with toy passes."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra import registry
from pangu_light.tools import cli, compile_cmd
from pangu_light.tools.cli import main

from toy_passes import W_VALUES, BreakShapePass, NoOpPass, ScaleWeightPass, build_model


@pytest.fixture(autouse=True)
def only_compile_command(monkeypatch):
    """The CLI imports every command module; the others are not this test's concern."""
    monkeypatch.setattr(cli, "COMMANDS", {"compile": "pangu_light.tools.compile_cmd"})


@pytest.fixture
def toy_registry(monkeypatch):
    for cls in (ScaleWeightPass, BreakShapePass, NoOpPass):
        monkeypatch.setitem(registry.PASSES, cls.name, cls)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    ir.save(build_model(), path)
    return path


def test_compile_writes_the_rewritten_model_with_provenance(toy_registry, model_path, tmp_path, capsys):
    out = tmp_path / "out" / "pruned.onnx"
    dumps = tmp_path / "dumps"
    status = main(
        [
            "compile", str(model_path), "-o", str(out), "--verify",
            "--pipeline", " scale-weight { factor = 3 } , no-op , scale-weight",
            "--dump-after-change", str(dumps),
        ]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "pipeline: scale-weight{factor=3},no-op,scale-weight" in printed
    assert f"wrote {out}" in printed
    result = ir.load(out)
    np.testing.assert_allclose(result.graph.initializers["W"].const_value.numpy(), 6 * W_VALUES, rtol=1e-6)
    assert result.metadata_props["pangu_light.pipeline"] == "scale-weight{factor=3},no-op,scale-weight"
    assert [e["modified"] for e in json.loads(result.metadata_props["pangu_light.pass_stats"])] == [True, False, True]
    assert result.graph.initializers["W"].metadata_props["pangu_light.pass"] == "scale-weight"
    assert sorted(p.name for p in dumps.iterdir()) == ["01-scale-weight.onnx", "03-scale-weight.onnx"]
    first_dump = ir.load(dumps / "01-scale-weight.onnx")
    np.testing.assert_allclose(first_dump.graph.initializers["W"].const_value.numpy(), 3 * W_VALUES, rtol=1e-6)
    # The input is untouched.
    np.testing.assert_array_equal(ir.load(model_path).graph.initializers["W"].const_value.numpy(), W_VALUES)


def test_output_equal_to_input_is_refused(toy_registry, model_path, capsys):
    before = model_path.read_bytes()
    status = main(["compile", str(model_path), "-o", str(model_path), "--pipeline", "scale-weight"])
    assert status == 2
    assert capsys.readouterr().err == (
        f"error: output {model_path} is the same file as input {model_path}; inputs are never "
        "overwritten: choose another -o path\n"
    )
    assert model_path.read_bytes() == before


def test_a_failing_pipeline_leaves_no_output_file(toy_registry, model_path, tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    status = main(
        ["compile", str(model_path), "-o", str(out), "--verify", "--pipeline", "scale-weight,break-shape"]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: graph is invalid after pass break-shape (step 2 of 2, after scale-weight): shape inference:"
    )
    assert "Incompatible dimensions for matrix multiplication" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_bad_option_fails_before_loading(toy_registry, tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    missing = tmp_path / "missing.onnx"
    status = main(["compile", str(missing), "-o", str(out), "--pipeline", "scale-weight{facter=2}"])
    assert status == 2
    assert capsys.readouterr().err == (
        "error: pass scale-weight: unknown option 'facter'; valid options: factor (float, default 2.0)\n"
    )
    assert not out.exists()


def test_missing_arguments_are_named(capsys):
    assert main(["compile", "model.onnx"]) == 2
    assert capsys.readouterr().err.startswith("error: compile needs -o OUTPUT, one of --pipeline or --plan; e.g.")


def test_list_passes(toy_registry, capsys):
    assert main(["compile", "--list-passes"]) == 0
    out = capsys.readouterr().out
    assert "scale-weight\n    options: factor (float, default 2.0)" in out
    assert "no-op\n    options: none" in out
    assert "drop-layers" in out and "slice-hidden" in out


def test_help_explains_the_pipeline_syntax():
    assert "drop-layers{layers=[12,13,14]},slice-hidden{keep_first=448}" in compile_cmd.__doc__
    with pytest.raises(SystemExit):
        main(["compile", "--help"])


def test_parse_error_is_a_user_error(model_path, tmp_path):
    args = compile_cmd.argparse.Namespace(
        model=model_path, output=tmp_path / "o.onnx", pipeline="scale-weight{", list_passes=False,
        verify=False, dump_after_change=None, progress=False, plan=None, no_slnp=False,
    )  # fmt: skip
    with pytest.raises(PanguLightError, match=r"at position 13 expected an option name"):
        compile_cmd.run(args)
