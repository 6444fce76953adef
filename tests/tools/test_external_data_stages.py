"""Every command on graphs whose weights are in an external file gives what it gives on the
embedded layout: export, calibrate, plan, compile --plan, eval, diff, inspect and run, on a tiny
model saved to disk with a character-level tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pangu_light.calib.stats import CalibrationStats
from pangu_light.passes.infra.graph_io import data_files, load_model
from pangu_light.tools.cli import main

from families import tiny_model
from reference import save_char_tokenizer


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The same model exported twice: embedded, and with its weights in a side file."""
    directory = tmp_path_factory.mktemp("tiny-llama-chars")
    tiny_model("llama").save_pretrained(directory)
    save_char_tokenizer(directory)
    paths = {}
    with pytest.MonkeyPatch.context() as patch:
        for layout, threshold in (("embedded", None), ("external", "0")):
            if threshold is not None:
                patch.setenv("PANGU_LIGHT_EXTERNAL_DATA_BYTES", threshold)
            out = tmp_path_factory.mktemp(layout)
            assert main(["export", str(directory), "-o", str(out / "model.onnx"),
                         "--decode-output", str(out / "decode.onnx"), "--quiet"]) == 0
            paths[layout] = out
    assert not data_files(paths["embedded"] / "model.onnx")
    assert data_files(paths["external"] / "model.onnx") and data_files(paths["external"] / "decode.onnx")
    return paths


def test_stages_agree_across_layouts(graphs, capsys, monkeypatch):
    results = {}
    for layout, out in graphs.items():
        if layout == "external":
            monkeypatch.setenv("PANGU_LIGHT_EXTERNAL_DATA_BYTES", "0")
        calib = ["--data", "wiki", "--samples", "4", "--seq-len", "24", "--quiet"]
        assert main(["calibrate", str(out / "model.onnx"), *calib, "-o", str(out / "stats.npz")]) == 0
        assert main(["plan", str(out / "stats.npz"), "--drop-layers", "1", "--ffn", "48",
                     "-o", str(out / "plan.json")]) == 0
        for graph in ("model", "decode"):
            assert main(["compile", str(out / f"{graph}.onnx"), "--plan", str(out / "plan.json"),
                         "-o", str(out / f"pruned-{graph}.onnx")]) == 0
        capsys.readouterr()
        assert main(["eval", str(out / "pruned-model.onnx"), "--data", "wiki", "--samples", "2",
                     "--seq-len", "16", "--json", "--quiet"]) == 0
        evaluation = json.loads(capsys.readouterr().out)
        assert main(["diff", str(out / "model.onnx"), str(out / "pruned-model.onnx")]) == 0
        assert main(["run", str(out / "pruned-decode.onnx"), "--prompt", "the cat", "--max-new-tokens", "4",
                     "--provider", "cpu"]) == 0
        text = capsys.readouterr().out
        results[layout] = (CalibrationStats.load(out / "stats.npz"), evaluation, text)
        if layout == "external":
            assert data_files(out / "pruned-model.onnx") and data_files(out / "pruned-decode.onnx")
    (s1, e1, t1), (s2, e2, t2) = results["embedded"], results["external"]
    np.testing.assert_array_equal(s1.channel, s2.channel)
    np.testing.assert_array_equal(s1.block_influence, s2.block_influence)
    for a, b in zip(s1.ffn, s2.ffn):
        np.testing.assert_array_equal(a, b)
    strip = (lambda e: json.dumps(e, sort_keys=True).replace(str(graphs["embedded"]), "").replace(
        str(graphs["external"]), ""))
    assert strip(e1) == strip(e2)
    untimed = [  # diff's table and the generated text; run's timing line differs run to run
        [line for line in t.replace(str(graphs[layout]), "").splitlines() if "tokens/s" not in line]
        for t, layout in ((t1, "embedded"), (t2, "external"))
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) > 5
    for graph in ("pruned-model", "pruned-decode"):
        a, b = (load_model(out / f"{graph}.onnx").graph.initializers for out in graphs.values())
        assert {k: v.const_value.tobytes() for k, v in a.items()} == {k: v.const_value.tobytes() for k, v in b.items()}
