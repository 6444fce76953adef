"""Graphs whose weights live in an external file: read, rewritten and written like embedded ones.

The same tiny graph is kept in both layouts; after every pass of a full plan pipeline (and the
passes a plan does not use) each is saved in its own layout and loaded again, and the two must
hold byte-identical initializers and the same nodes. Damaged weights files give one line naming
the file; a killed compile leaves no output behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx_ir as ir
import pytest

from pangu_light.calib.planner import Targets, make_plan
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import data_files, load_model, save_model_atomic
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parents[1] / "calib"))
from test_planner import fake_stats  # noqa: E402


def _initializers(model: ir.Model) -> dict[str, tuple[str, tuple, bytes]]:
    return {
        name: (str(v.const_value.dtype), tuple(v.const_value.shape), v.const_value.tobytes())
        for name, v in model.graph.initializers.items()
    }


def _nodes(model: ir.Model) -> list[tuple]:
    return [(n.op_type, tuple(v.name if v is not None else "" for v in n.inputs)) for n in model.graph]


def _assert_same(embedded: ir.Model, external: ir.Model, where: str) -> None:
    a, b = _initializers(embedded), _initializers(external)
    assert a.keys() == b.keys(), where
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"{where}: initializers differ: {different[:5]}"
    assert _nodes(embedded) == _nodes(external), where
    assert dict(embedded.metadata_props) == dict(external.metadata_props), where


def _both_layouts(path: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = load_model(path)
    embedded = save_model_atomic(model, tmp_path / "embedded" / "model.onnx", external=False)
    external = save_model_atomic(model, tmp_path / "external" / "model.onnx", external=True)
    assert not data_files(embedded) and len(data_files(external)) == 1
    assert os.path.getsize(external) < os.path.getsize(embedded) / 2  # the weights really moved out
    return embedded, external


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_plan_pass_gives_identical_initializers_in_both_layouts(exported_graph, family, tmp_path):
    _, path = exported_graph(family)
    embedded, external = _both_layouts(path, tmp_path)
    model_map = ModelMap.from_model(load_model(embedded))
    attention = model_map.layers[0].attention
    targets = Targets(
        hidden=model_map.hidden_size - 8,
        heads_per_group=max(1, attention.num_heads // attention.num_kv_heads - 1),
        kv_groups=max(1, attention.num_kv_heads - 1),
        ffn=model_map.layers[0].ffn.intermediate_size // 2,
        drop_layers=1,
        clap=True,
        absorb_post_norms=family == "gemma3",
    )
    plan = make_plan(model_map, fake_stats(model_map, seed=3), targets)
    steps = list(plan.pipeline())
    names = {s.name for s in steps}
    assert {"prune-heads", "prune-ffn", "slice-hidden", "slnp", "drop-layers"} <= names, [str(s) for s in steps]
    for i, step in enumerate(steps):
        models = []
        for layout, source in (("embedded", embedded), ("external", external)):
            model = load_model(source)
            if i == 0:
                plan.attach(model)
            run_pipeline(model, str(Pipeline([step])))
            target = tmp_path / f"{layout}-{i}" / "model.onnx"
            save_model_atomic(model, target, external=layout == "external")
            models.append(load_model(target))
            if layout == "embedded":
                embedded = target
            else:
                external = target
        assert data_files(external) and not data_files(embedded)
        _assert_same(*models, where=f"after {step}")


@pytest.mark.parametrize(
    "family, pipeline", [("gemma3", "drop-post-norm"), ("llama", "fold-weight-transpose")]
)
def test_passes_outside_the_plan_give_identical_initializers(exported_graph, family, pipeline, tmp_path):
    _, path = exported_graph(family)
    models = []
    for layout, source in zip(("embedded", "external"), _both_layouts(path, tmp_path)):
        model = load_model(source)
        run_pipeline(model, pipeline)
        target = tmp_path / f"{layout}-out" / "model.onnx"
        save_model_atomic(model, target, external=layout == "external")
        models.append(load_model(target))
    _assert_same(*models, where=pipeline)


def test_unchanged_weights_are_not_decoded_when_loaded(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    _, external = _both_layouts(path, tmp_path)
    model = load_model(external)
    kinds = {type(v.const_value).__name__ for v in model.graph.initializers.values() if v.const_value.nbytes > 1024}
    assert kinds == {"ExternalTensor"}  # mapped lazily, read only when a pass uses them


def test_missing_weights_file_is_one_clear_line(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    _, external = _both_layouts(path, tmp_path)
    (data,) = data_files(external)
    data.unlink()
    with pytest.raises(PanguLightError) as error:
        load_model(external)
    message = str(error.value)
    assert "\n" not in message and str(data) in message and "missing" in message


def test_truncated_weights_file_is_one_clear_line(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    _, external = _both_layouts(path, tmp_path)
    (data,) = data_files(external)
    os.truncate(data, data.stat().st_size - 100)
    with pytest.raises(PanguLightError) as error:
        load_model(external)
    message = str(error.value)
    assert "\n" not in message and str(data) in message and "truncated" in message


def test_rewriting_a_path_replaces_the_pair_and_removes_the_old_weights(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    model = load_model(path)
    target = tmp_path / "model.onnx"
    save_model_atomic(model, target, external=True)
    (first,) = data_files(target)
    save_model_atomic(model, target, external=True)
    (second,) = data_files(target)
    assert first != second and not first.exists()
    _assert_same(load_model(path), load_model(target), where="rewritten")
    save_model_atomic(model, target, external=False)
    assert not data_files(target)


def test_killed_compile_leaves_no_partial_output(exported_graph, tmp_path):
    """Kill `pangu-light compile` at several moments; each time the output is absent or a
    complete pair that loads, never a graph without its weights or half a weights file."""
    _, path = exported_graph("llama")
    source = save_model_atomic(load_model(path), tmp_path / "in" / "model.onnx", external=True)
    env = {**os.environ, "PANGU_LIGHT_EXTERNAL_DATA_BYTES": "0"}  # the output is external too
    outcomes = set()
    for delay in (0.5, 1.5, 2.5, 3.5, 5.0, 30.0):
        out = tmp_path / f"out-{delay}" / "pruned.onnx"
        process = subprocess.Popen(
            [sys.executable, "-m", "pangu_light.tools.cli", "compile", str(source),
             "--pipeline", "prune-ffn{keep_first=8}", "-o", str(out)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + delay
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        finished = process.poll() is not None
        if not finished:
            process.send_signal(signal.SIGKILL)
        process.wait()
        listing = out.parent.iterdir() if out.parent.exists() else []
        visible = sorted(p.name for p in listing if not p.name.startswith("."))
        if out.exists():
            assert len(data_files(out)) == 1 and len(visible) == 2, visible
            assert ModelMap.from_model(load_model(out)).layers[0].ffn.intermediate_size == 8
            outcomes.add("complete")
        else:
            assert visible == [], f"killed after {delay} s, left {visible}"
            outcomes.add("nothing")
    assert "complete" in outcomes  # the last run had time to finish
