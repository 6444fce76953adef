"""`prune` and `plan` with --hidden-method rotate, end to end on a tiny Llama with a character
tokenizer: the plan records the method, the rotation file and corrections; compile runs
rotate-hidden from the plan; the no-cache and decode graphs agree; the refit applies."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.plan import load_plan
from pangu_light.passes.rewrites.rotate_hidden import ROTATION_KEY, load_rotation
from pangu_light.tools.cli import main

from families import tiny_model
from reference import left_padded_batch, max_diff_on_tokens, ort_decode_logits, ort_logits, save_char_tokenizer

CALIB = ["--data", "wiki", "--samples", "6", "--seq-len", "24", "--quiet"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-chars-rotate")
    tiny_model("llama").save_pretrained(path)
    save_char_tokenizer(path)
    return path


def test_prune_with_rotation(tiny_dir, tmp_path):
    out = tmp_path / "job"
    args = ["prune", str(tiny_dir), "--hidden", "40", "--heads-per-group", "1", "--ffn", "64",
            "--hidden-method", "rotate", "-o", str(out), *CALIB, "--eval-samples", "3", "--eval-seq-len", "16"]
    assert main(args) == 0
    plan = load_plan(out / "plan.json")
    assert plan.hidden_method == "rotate" and plan.hidden == list(range(40))
    assert plan.rotation["file"] == str((out / "rotation.npz").resolve())
    assert load_rotation(out / "rotation.npz").basis.shape == (64, 64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hidden_method"] == "rotate" and summary["graphs"]["pruned"]["hidden_size"] == 40
    assert np.isfinite(summary["graphs"]["pruned"]["perplexity"])
    for name in ("pruned.onnx", "pruned-kv.onnx"):
        model = ir.load(out / name)
        assert ModelMap.from_model(model).hidden_size == 40
        assert json.loads(model.metadata_props[ROTATION_KEY])["rms_correction"] == pytest.approx(
            plan.rotation["rms_correction"], abs=1e-6)
        assert "rotate-hidden" in model.metadata_props["pangu_light.pipeline"]
    ids, mask = left_padded_batch(160)
    decoded, all_ids, all_mask = ort_decode_logits(out / "pruned-kv.onnx", ids, mask, steps=3)
    full = ort_logits(out / "pruned.onnx", all_ids, all_mask)
    assert max_diff_on_tokens(decoded, full, all_mask) <= 2e-4 + 3e-5 * float(np.abs(full).max())


def test_plan_with_rotation_then_compile(tiny_dir, tmp_path, capsys):
    graph, stats, plan_path = tmp_path / "model.onnx", tmp_path / "stats.npz", tmp_path / "plan.json"
    assert main(["export", str(tiny_dir), "-o", str(graph), "--quiet"]) == 0
    assert main(["calibrate", str(graph), *CALIB, "-o", str(stats)]) == 0
    assert main(["plan", str(stats), "--hidden", "48", "--hidden-method", "rotate", "-o", str(plan_path)]) == 0
    assert (tmp_path / "plan-rotation.npz").is_file()
    plan = json.loads(plan_path.read_text())
    assert plan["hidden"]["method"] == "rotate" and len(plan["hidden"]["rotation"]["rms_correction"]) == 9
    assert main(["compile", str(graph), "--plan", str(plan_path), "-o", str(tmp_path / "p.onnx")]) == 0
    assert "rotate-hidden{plan=true}" in capsys.readouterr().out
    assert ModelMap.from_model(ir.load(tmp_path / "p.onnx")).hidden_size == 48
    # select is plan's default; auto rotates a pre-norm model's cut hidden size, else selects
    select = ["plan", str(stats), "--hidden", "48", "--hidden-method", "select", "-o", str(tmp_path / "s.json")]
    assert main(select) == 0
    assert json.loads((tmp_path / "s.json").read_text())["hidden"]["method"] == "select"
    rotation = ["--hidden-method", "auto", "--rotation", str(tmp_path / "plan-rotation.npz")]
    assert main(["plan", str(stats), "--hidden", "48", *rotation, "-o", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["hidden"]["method"] == "rotate"
    assert main(["plan", str(stats), "--ffn", "48", "--hidden-method", "auto", "-o", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["hidden"]["method"] == "select"
