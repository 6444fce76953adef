"""`pangu-light export` and `pangu-light inspect` end to end on a tiny model saved to disk.

The tiny Llama is written with ``save_pretrained`` and passed as MODEL (a local directory),
so the CLI runs its real path: resolve, check the config, load, export, save, summarise.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.tools import cli
from pangu_light.tools.cli import main

from families import tiny_model


@pytest.fixture(autouse=True)
def only_export_and_inspect(monkeypatch):
    monkeypatch.setattr(
        cli, "COMMANDS", {"export": cli.COMMANDS["export"], "inspect": cli.COMMANDS["inspect"]}
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """One CLI export for the whole module: (output path, stdout, stderr)."""
    model_dir, _ = tiny_dir
    out = tmp_path_factory.mktemp("export") / "sub" / "model.onnx"  # a parent that does not exist yet
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse fixture is not active yet
        patch.setattr(cli, "COMMANDS", {"export": cli.COMMANDS["export"]})
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["export", str(model_dir), "-o", str(out)])
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


# ----------------------------------------------------------------------------- export
def test_export_writes_a_loadable_graph_that_computes_the_model(exported, tiny_dir):
    out, stdout, stderr = exported
    model_dir, hf_model = tiny_dir
    model = ir.load(out)
    assert model.metadata_props["pangu_light.tokenizer"] == str(model_dir.resolve())
    assert model.metadata_props["pangu_light.source_model"] == str(model_dir)
    assert model.metadata_props["pangu_light.graph_kind"] == "no-cache"
    model_map = ModelMap.from_model(model)
    assert (len(model_map.layers), model_map.hidden_size) == (4, 64)
    # The summary and what was written are printed; progress notes go to stderr.
    assert model_map.summary() in stdout
    assert f"wrote {out}" in stdout and " s; peak memory " in stdout
    for step in ("loading", "exporting", "saving"):
        assert f"... {step}" in stderr
    assert not list(out.parent.glob(".*partial"))
    # The file computes the model (tiny models agree to ~1e-7; see tests/frontend/test_export.py).
    ids = np.array([[5, 17, 42, 99, 7]], dtype=np.int64)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    with torch.no_grad():
        reference = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - reference).max() <= 1e-5


def test_export_missing_model_dir(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "no-such-model"), "-o", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "no-such-model" in line and "no such alias, file or directory" in line
    assert list(tmp_path.iterdir()) == []


def test_export_unsupported_architecture_fails_before_loading(tmp_path, capsys):
    model_dir = tmp_path / "gpt2"
    transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0
    ).save_pretrained(model_dir)
    out = tmp_path / "model.onnx"
    # Only config.json exists: a failure to *load* would name missing weights instead.
    assert main(["export", str(model_dir), "-o", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "'gpt2'" in line and "supported decoder-only families" in line and "llama" in line
    assert not out.exists()


def test_export_refuses_a_directory_as_output(tiny_dir, tmp_path, capsys):
    model_dir, _ = tiny_dir
    assert main(["export", str(model_dir), "-o", str(tmp_path)]) == 2
    assert "is a directory" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_the_model_files(tiny_dir, capsys):
    model_dir, _ = tiny_dir
    target = model_dir / "config.json"
    before = target.read_bytes()
    assert main(["export", str(model_dir), "-o", str(target)]) == 2
    assert "never overwritten" in _one_line_error(capsys)
    assert target.read_bytes() == before


def test_export_needs_an_output(tiny_dir, capsys):
    model_dir, _ = tiny_dir
    assert main(["export", str(model_dir)]) == 2
    assert "-o OUTPUT" in _one_line_error(capsys)


def test_export_model_defaults_to_the_embedded_model():
    parser = cli.build_parser()
    args = parser.parse_args(["export", "-o", "x.onnx"])
    assert args.model == "smollm2-135m" and not args.kv_cache


# ----------------------------------------------------------------------------- inspect
def test_inspect_json_matches_the_model_map(exported, tiny_dir, capsys):
    out, _, _ = exported
    model_dir, hf_model = tiny_dir
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_map"] == ModelMap.from_model(ir.load(out)).to_json()
    assert data["model_map"]["num_layers"] == hf_model.config.num_hidden_layers
    assert [e["name"] for e in data["inputs"]] == ["input_ids", "attention_mask"]
    assert data["outputs"][0]["name"] == "logits"
    assert data["outputs"][0]["shape"][-1] == hf_model.config.vocab_size
    assert isinstance(data["outputs"][0]["shape"][0], str)  # the batch dimension is symbolic
    meta = data["metadata"]
    assert meta["pangu_light.source_model"] == str(model_dir)
    assert meta["pangu_light.source_config"]["hidden_size"] == 64  # JSON values are parsed


def test_inspect_text(exported, capsys):
    out, _, _ = exported
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert ModelMap.from_model(ir.load(out)).summary() in text
    assert "input_ids" in text and "logits" in text and "[batch, sequence, 160]" in text
    assert "pangu_light.family: llama" in text
    assert "pangu_light.source_config: (" in text  # long config elided from the table


def test_inspect_decode_graph_and_provenance(exported_graph, tmp_path, capsys):
    _, path = exported_graph("qwen3", kv_cache=True)
    model = ir.load(path)
    model.metadata_props["pangu_light.pipeline"] = "drop-layers{layers=[1]}"
    model.metadata_props["pangu_light.pass_stats"] = json.dumps(
        [{"pass": "drop-layers", "modified": True, "stats": {"layers_removed": 1}}]
    )
    marked = tmp_path / "marked.onnx"
    ir.save(model, marked)
    assert main(["inspect", str(marked)]) == 0
    text = capsys.readouterr().out
    assert "decode graph" in text
    assert "past_key_values.0.key" in text and "present.3.value" in text
    assert "pangu_light.pipeline: drop-layers{layers=[1]}" in text
    assert "drop-layers: changed; layers_removed=1" in text
    assert main(["inspect", str(marked), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["inputs"]) == 2 + 2 * 4 and len(data["outputs"]) == 1 + 2 * 4
    assert data["metadata"]["pangu_light.pass_stats"][0]["stats"] == {"layers_removed": 1}


def test_inspect_corrupt_file(tmp_path, capsys):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xfe" * 10)
    assert main(["inspect", str(path)]) == 2
    assert str(path) in _one_line_error(capsys)


def test_inspect_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.onnx")]) == 2
    assert "no such file" in _one_line_error(capsys)


def test_inspect_graph_that_is_not_an_llm(tmp_path, capsys):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    w = ir.Value(name="W", const_value=ir.tensor(np.ones((4, 3), dtype=np.float32), name="W"))
    node = ir.Node("", "MatMul", [x, w], outputs=[ir.Value(name="y")])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18})
    path = tmp_path / "toy.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    assert main(["inspect", str(path)]) == 2
    line = _one_line_error(capsys)
    assert str(path) in line and "not a decoder-only LLM graph" in line
