"""The export stage on a checkpoint directory: traced on empty weights, weights attached from the
safetensors by name, structures reused from the cache; the graphs equal the ones exported from
the loaded model (same nodes, metadata and byte-identical initializers)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from pangu_light.core import contract
from pangu_light.frontend.export_stage import export_graphs
from pangu_light.frontend.weights import safetensors_index
from pangu_light.passes.infra.graph_io import load_model

from families import tiny_model


def _initializers(model: ir.Model) -> dict[str, bytes]:
    return {name: v.const_value.tobytes() for name, v in model.graph.initializers.items()}


def _nodes(model: ir.Model) -> list[tuple]:
    return [
        (n.name, n.op_type, tuple(v.name if v is not None else "" for v in n.inputs), tuple(v.name for v in n.outputs),
         tuple(sorted(n.metadata_props.items())))
        for n in model.graph
    ]


@pytest.fixture
def structure_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PANGU_LIGHT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "structures"


@pytest.mark.parametrize("family", [
    "llama",  # tied embedding
    "gemma3",  # sandwich norms, buffers, and a set of layer types (see test_export_determinism.py)
])
def test_export_from_safetensors_equals_export_of_the_loaded_model(exported_graph, family, tmp_path, structure_cache):
    model, _ = exported_graph(family)
    model_dir = tmp_path / "hf"
    model.save_pretrained(model_dir, safe_serialization=True)
    assert safetensors_index(model_dir) is not None
    outputs = {False: tmp_path / "a" / "model.onnx", True: tmp_path / "a" / "decode.onnx"}
    notes: list[str] = []
    export_graphs(str(model_dir), outputs, progress=notes.append)
    assert any("as an empty model" in n for n in notes) and not any("(float32)" in n for n in notes)
    for kv_cache, output in outputs.items():
        _, reference_path = exported_graph(family, kv_cache=kv_cache)
        reference, graph = load_model(reference_path), load_model(output)
        assert _nodes(graph) == _nodes(reference), kv_cache
        assert _initializers(graph) == _initializers(reference), kv_cache
        ignored = (contract.TOKENIZER, contract.SOURCE_MODEL, contract.SOURCE_CONFIG)
        kept = [{k: v for k, v in g.metadata_props.items() if k not in ignored} for g in (graph, reference)]
        assert kept[0] == kept[1]
        assert graph.metadata_props[contract.SOURCE_MODEL] == str(model_dir)

    # Again: both structures come from the cache, and the graphs are the same.
    assert len(list(structure_cache.glob("*/*.onnx"))) == 2
    again = {False: tmp_path / "b" / "model.onnx", True: tmp_path / "b" / "decode.onnx"}
    notes.clear()
    export_graphs(str(model_dir), again, progress=notes.append)
    assert sum("reusing the structure" in n for n in notes) == 2 and not any("tracing (" in n for n in notes)
    for kv_cache in (False, True):
        first, second = load_model(outputs[kv_cache]), load_model(again[kv_cache])
        assert _nodes(first) == _nodes(second) and _initializers(first) == _initializers(second)
        assert dict(first.metadata_props) == dict(second.metadata_props)


def test_other_weights_with_a_cached_structure_are_attached(exported_graph, tmp_path, structure_cache):
    """Two checkpoints of one config share the structure; each graph has its own weights."""
    first, second = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    for i, model in enumerate((first, second)):
        model.save_pretrained(tmp_path / f"hf{i}", safe_serialization=True)
        export_graphs(str(tmp_path / f"hf{i}"), {False: tmp_path / f"m{i}.onnx"})
    assert len(list(structure_cache.glob("*/*.onnx"))) == 1
    graphs = [load_model(tmp_path / f"m{i}.onnx") for i in range(2)]
    weight = "model.layers.0.mlp.down_proj.weight"
    for graph, model in zip(graphs, (first, second)):
        expected = model.get_parameter(weight).detach().numpy().tobytes()
        assert graph.graph.initializers[weight].const_value.tobytes() == expected
    assert _nodes(graphs[0]) == _nodes(graphs[1])


def test_a_checkpoint_without_safetensors_is_loaded(exported_graph, tmp_path, structure_cache, monkeypatch):
    from pangu_light.frontend import export_stage

    model, reference_path = exported_graph("llama")
    model.save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(export_stage, "safetensors_index", lambda directory: None)  # as for a .bin checkpoint
    notes: list[str] = []
    export_graphs(str(tmp_path / "hf"), {False: tmp_path / "m.onnx"}, progress=notes.append)
    assert any(n.startswith("loading") and "(float32)" in n for n in notes)
    assert _initializers(load_model(tmp_path / "m.onnx")) == _initializers(load_model(reference_path))
