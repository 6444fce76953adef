"""``export --dtype`` from a float32 safetensors checkpoint: traced on an empty half model, each
weight converted once as torch's ``.to(dtype)`` rounds it; the graph equals the export of the
model cast in torch (same nodes, byte-identical initializers), and the structure cache keeps
one structure per dtype."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.export_stage import export_graphs
from pangu_light.passes.infra.graph_io import load_model


def _nodes(model: ir.Model) -> list[tuple]:
    return [(n.op_type, tuple(v.name if v is not None else "" for v in n.inputs), tuple(v.name for v in n.outputs))
            for n in model.graph]


def test_half_export_from_float32_safetensors(exported_graph, tmp_path, monkeypatch):
    monkeypatch.setenv("PANGU_LIGHT_CACHE", str(tmp_path / "cache"))
    model, _ = exported_graph("llama")
    model_dir = tmp_path / "hf"
    model.save_pretrained(model_dir, safe_serialization=True)  # float32 weights
    notes: list[str] = []
    output = tmp_path / "bf16.onnx"
    export_graphs(str(model_dir), {False: output}, progress=notes.append, dtype="bfloat16")
    assert any("as an empty model" in n for n in notes) and any("in bfloat16" in n for n in notes)
    _, reference_path = exported_graph("llama", dtype="bfloat16")
    graph, reference = load_model(output), load_model(reference_path)
    assert _nodes(graph) == _nodes(reference)
    for name, value in reference.graph.initializers.items():
        assert graph.graph.initializers[name].dtype == value.dtype, name
        assert graph.graph.initializers[name].const_value.tobytes() == value.const_value.tobytes(), name
    # float16 is another structure: traced, not taken from the bfloat16 one in the cache
    notes.clear()
    export_graphs(str(model_dir), {False: tmp_path / "fp16.onnx"}, progress=notes.append, dtype="float16")
    assert not any("reusing the structure" in n for n in notes)
    assert load_model(tmp_path / "fp16.onnx").graph.outputs[0].dtype == ir.DataType.FLOAT16


def test_unknown_dtype_is_one_line(tmp_path):
    with pytest.raises(PanguLightError, match="unknown dtype 'int8'; use one of float32, float16, bfloat16"):
        export_graphs("random:llama-tiny", {False: tmp_path / "m.onnx"}, dtype="int8")
