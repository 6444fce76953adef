"""`pangu-light diff` on exported tiny graphs, hand-edited copies and drop-layers outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.core.contract import PASS_STATS as PASS_STATS_KEY
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.analysis.graph_utils import replace_initializer
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.tools import cli, diff_cmd
from pangu_light.tools.cli import main


@pytest.fixture(autouse=True)
def only_diff_command(monkeypatch):
    # Other command modules are written alongside this one; the CLI imports every module
    # in its table, so keep the table to the command under test.
    monkeypatch.setattr(cli, "COMMANDS", {"diff": "pangu_light.tools.diff_cmd"})


def layer_params(hf_model, index: int) -> int:
    return sum(p.numel() for p in hf_model.model.layers[index].parameters())


def diff_json(capsys, *argv) -> dict:
    assert main(["diff", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def compiled(path, tmp_path, pipeline: str, name: str):
    model = ir.load(path)
    run_pipeline(model, pipeline)
    out = tmp_path / name
    ir.save(model, out)
    return out


def test_model_against_itself(exported_graph, capsys):
    hf_model, path = exported_graph("llama")
    diff = diff_json(capsys, path, path)
    params = sum(p.numel() for p in hf_model.parameters())
    assert diff["parameters"] == {"a": params, "b": params, "difference": 0, "ratio": 1.0}
    assert diff["flops_per_token"]["ratio"] == 1.0
    assert diff["layers"]["removed"] == []
    assert diff["layers"]["matched_by"] == "same number of layers"
    assert [(r["a_index"], r["b_index"], r["changed"]) for r in diff["layers"]["rows"]] == [
        (i, i, []) for i in range(4)
    ]
    assert diff["op_counts"] == {} and diff["pipeline_b"] is None
    assert main(["diff", str(path), str(path)]) == 0
    text = capsys.readouterr().out
    assert "removed from A: none" in text and "op counts: the same" in text
    assert "parameters" in text and "1.0000" in text


def test_sliced_ffn_shows_the_parameter_difference(exported_graph, tmp_path, capsys):
    hf_model, path = exported_graph("glm4")  # fused gate_up, untied embeddings
    model = ir.load(path)
    ffn = ModelMap.from_model(model).layer(3).ffn
    width, hidden = ffn.intermediate_size, hf_model.config.hidden_size
    gate_up = ffn.gate.weight.const_value.numpy()
    replace_initializer(ffn.gate.weight, np.concatenate([gate_up[:32], gate_up[width:width + 32]]))
    replace_initializer(ffn.down.weight, ffn.down.weight.const_value.numpy()[:, :32])
    edited = tmp_path / "edited.onnx"
    ir.save(model, edited)

    diff = diff_json(capsys, path, edited, "--context", "16")
    removed = 3 * hidden * (width - 32)
    assert diff["parameters"]["difference"] == -removed
    assert diff["parameters"]["ratio"] == pytest.approx(1 - removed / sum(p.numel() for p in hf_model.parameters()))
    assert diff["flops_parts"]["projections"]["difference"] == -2 * removed
    assert diff["flops_parts"]["attention"]["ratio"] == 1.0
    assert diff["context"] == 16
    rows = diff["layers"]["rows"]
    assert [r["changed"] for r in rows] == [[], [], [], ["intermediate_size", "parameters"]]
    assert rows[3]["b"]["intermediate_size"] == 32
    assert rows[3]["a"]["parameters"] - rows[3]["b"]["parameters"] == removed
    assert diff["layers"]["removed"] == []


def test_drop_layers_is_identified(exported_graph, tmp_path, capsys):
    hf_model, path = exported_graph("qwen3")
    pruned = compiled(path, tmp_path, "drop-layers{layers=[1]}", "pruned.onnx")
    diff = diff_json(capsys, path, pruned)
    params = sum(p.numel() for p in hf_model.parameters())
    assert diff["parameters"]["b"] == params - layer_params(hf_model, 1)
    assert diff["num_layers"] == {"a": 4, "b": 3, "difference": -1, "ratio": 0.75}
    assert diff["layers"]["removed"] == [1]
    assert diff["layers"]["matched_by"] == "B's drop-layers records"
    assert [(r["a_index"], r["b_index"]) for r in diff["layers"]["rows"]] == [(0, 0), (1, None), (2, 1), (3, 2)]
    assert diff["pipeline_b"] == "drop-layers{layers=[1]}"
    assert diff["tagged_initializers_b"] == {"drop-layers": 2 * 11}  # layers 2, 3: 7 projections, 4 norms
    assert diff["op_counts"]["MatMul"]["difference"] == -9  # 7 projections + 2 attention MatMuls

    assert main(["diff", str(path), str(pruned)]) == 0
    text = capsys.readouterr().out
    assert "removed from A: 1" in text
    assert "pipeline of B: drop-layers{layers=[1]}" in text
    assert "tagged initializers in B: drop-layers 22" in text


def test_chained_compiles_map_back_to_the_original_layers(exported_graph, tmp_path, capsys):
    _, path = exported_graph("llama")
    first = compiled(path, tmp_path, "drop-layers{layers=[1]}", "first.onnx")
    second = compiled(first, tmp_path, "drop-layers{layers=[0]}", "second.onnx")
    # Original layers 0..3 -> drop 1 -> (0, 2, 3) -> drop position 0 -> (2, 3).
    diff = diff_json(capsys, path, second)
    assert diff["layers"]["removed"] == [0, 1]
    assert [(r["a_index"], r["b_index"]) for r in diff["layers"]["rows"]] == [(0, None), (1, None), (2, 0), (3, 1)]
    # Against the intermediate model only the second record is new.
    diff = diff_json(capsys, first, second)
    assert diff["layers"]["removed"] == [0]


def test_unknown_removal_shows_the_count(exported_graph, tmp_path, capsys):
    _, path = exported_graph("llama")
    model = ir.load(path)
    run_pipeline(model, "drop-layers{layers=[2]}")
    del model.metadata_props[PASS_STATS_KEY]  # provenance lost
    stripped = tmp_path / "stripped.onnx"
    ir.save(model, stripped)
    diff = diff_json(capsys, path, stripped)
    assert diff["layers"]["removed"] is None and diff["layers"]["matched_by"] is None
    assert diff["num_layers"]["difference"] == -1
    assert main(["diff", str(path), str(stripped)]) == 0
    text = capsys.readouterr().out
    assert "cannot tell which layers were removed" in text and "(+1 removed)" in text


def test_match_layers_refuses_unrelated_records(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    a = compiled(path, tmp_path, "drop-layers{layers=[3]}", "a.onnx")
    b = compiled(path, tmp_path, "drop-layers{layers=[0,1]}", "b.onnx")
    origin, reason = diff_cmd.match_layers(GraphStats.from_model(ir.load(a)), GraphStats.from_model(ir.load(b)))
    assert origin is None and "not compiled from A" in reason


def test_corrupt_file_is_one_line_exit_2(exported_graph, tmp_path, capsys):
    _, path = exported_graph("llama")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe")
    assert main(["diff", str(path), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert str(bad) in captured.err


def test_missing_file_and_bad_context(exported_graph, tmp_path, capsys):
    _, path = exported_graph("llama")
    assert main(["diff", str(path), str(tmp_path / "nope.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["diff", str(path), str(path), "--context", "0"]) == 2
    assert "--context must be a positive" in capsys.readouterr().err


def test_help_describes_the_counts(capsys):
    with pytest.raises(SystemExit):
        main(["diff", "--help"])
    out = capsys.readouterr().out
    assert "drop-layers" in out and "--context N" in out
