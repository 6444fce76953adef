"""`calibrate`, `plan`, `compile --plan`, `eval` and `prune` end to end on a tiny model saved to
disk with a character-level tokenizer (so real text maps into the tiny vocabulary)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.contract import PLAN as PLAN_KEY
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.infra.plan import load_plan
from pangu_light.tools.cli import main

from families import tiny_model
from reference import left_padded_batch, ort_logits, save_char_tokenizer, torch_drop_layers, torch_logits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-chars")
    model = tiny_model("llama")
    model.save_pretrained(path)
    save_char_tokenizer(path)
    return path, model


@pytest.fixture(scope="module")
def tiny_graph(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    assert main(["export", str(tiny_dir[0]), "-o", str(path), "--quiet"]) == 0
    return path


CALIB = ["--data", "wiki", "--samples", "6", "--seq-len", "24", "--quiet"]


def test_calibrate_plan_compile(tiny_graph, tiny_dir, tmp_path, capsys):
    stats_path, plan_path, out = tmp_path / "stats.npz", tmp_path / "plan.json", tmp_path / "pruned.onnx"
    assert main(["calibrate", str(tiny_graph), *CALIB, "-o", str(stats_path)]) == 0
    stats = CalibrationStats.load(stats_path)
    assert stats.tokens == 6 * 24 and stats.meta["data"] == "wiki" and stats.meta["graph"] == str(tiny_graph)
    assert main(["plan", str(stats_path), "--drop-layers", "1", "-o", str(plan_path)]) == 0
    plan = load_plan(plan_path)
    (dropped,) = plan.drop_layers
    assert dropped == int(np.argmin(stats.block_influence))
    assert main(["compile", str(tiny_graph), "--plan", str(plan_path), "-o", str(out)]) == 0
    pruned = ir.load(out)
    assert json.loads(pruned.metadata_props[PLAN_KEY])["drop_layers"] == [dropped]
    ids, mask = left_padded_batch(160)
    expected = torch_logits(torch_drop_layers(tiny_dir[1], [dropped]), ids, mask)
    got = ort_logits(out, ids, mask)
    assert np.abs(got - expected)[mask.numpy().astype(bool)].max() <= 1e-5


def test_plan_finds_the_graph_from_another_directory_and_after_a_move(tiny_graph, tmp_path, monkeypatch):
    """stats.npz names its graph relative to itself (absolute as fallback): `plan` works from
    any working directory, and after the output folder is moved."""
    job = tmp_path / "work" / "out"
    job.mkdir(parents=True)
    for file in tiny_graph.parent.iterdir():
        shutil.copy(file, job / file.name)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["calibrate", f"out/{tiny_graph.name}", *CALIB, "-o", "out/stats.npz"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["plan", "../work/out/stats.npz", "--drop-layers", "1", "-o", "plan.json"]) == 0
    assert load_plan(elsewhere / "plan.json").source["graph"]["relative"] == f"../work/out/{tiny_graph.name}"
    moved = tmp_path / "moved"
    shutil.move(job, moved)  # the absolute path recorded is gone; the relative one still holds
    assert main(["plan", str(moved / "stats.npz"), "--drop-layers", "1", "-o", "plan2.json"]) == 0
    assert CalibrationStats.load(moved / "stats.npz").meta["graph"] == str((moved / tiny_graph.name).resolve())
    (moved / tiny_graph.name).unlink()
    assert main(["plan", str(moved / "stats.npz"), "--drop-layers", "1", "-o", "plan3.json"]) == 2


def test_same_seed_same_plan(tiny_graph, tmp_path):
    plans = []
    for run, seed in enumerate(["3", "3", "4"]):
        stats = tmp_path / f"stats{run}.npz"
        assert main(["calibrate", str(tiny_graph), *CALIB, "--seed", seed, "-o", str(stats)]) == 0
        plan = tmp_path / f"plan{run}.json"
        assert main(["plan", str(stats), "--params", "0.6", "--drop-layers", "1", "-o", str(plan)]) == 0
        plans.append(load_plan(plan).to_json())
    # The hidden size is cut, so the plan rotates (the default, auto) and names its own basis file.
    files = [Path(plan["hidden"]["rotation"].pop("file")) for plan in plans]
    assert [f.name for f in files] == ["plan0-rotation.npz", "plan1-rotation.npz", "plan2-rotation.npz"]
    assert plans[0] == plans[1]
    first, second = (np.load(f) for f in files[:2])
    assert first.files == second.files and all(np.array_equal(first[k], second[k]) for k in first.files)
    assert CalibrationStats.load(tmp_path / "stats0.npz").channel.tolist() != CalibrationStats.load(
        tmp_path / "stats2.npz"
    ).channel.tolist()


def test_eval_reports_perplexity(tiny_graph, capsys):
    assert main(["eval", str(tiny_graph), "--samples", "3", "--seq-len", "16", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)[str(tiny_graph)]
    assert result["tokens"] == 3 * 15 and np.isfinite(result["perplexity"]) and result["perplexity"] > 1


def test_prune_writes_every_intermediate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "job"
    args = ["prune", str(tiny_dir[0]), "--params", "0.6", "--drop-layers", "1", "-o", str(out), *CALIB,
            "--eval-samples", "3", "--eval-seq-len", "16"]
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "original.onnx",
        "stats.npz",
        "plan.json",
        "pruned.onnx",
        "original-kv.onnx",
        "pruned-kv.onnx",
        "summary.json",
    } <= names
    summary = json.loads((out / "summary.json").read_text())
    pruned = GraphStats.from_model(ir.load(out / "pruned.onnx"))
    assert summary["graphs"]["pruned"]["parameters"] == pruned.total_parameters
    assert summary["graphs"]["pruned"]["layers"] == 3 and summary["graphs"]["original"]["layers"] == 4
    assert all(np.isfinite(g["perplexity"]) for g in summary["graphs"].values())
    table = capsys.readouterr().out
    assert "parameters" in table and "perplexity" in table
    # A second run reuses the exports.
    exported = (out / "original.onnx").stat().st_mtime_ns, (out / "original-kv.onnx").stat().st_mtime_ns
    assert main(args) == 0
    assert ((out / "original.onnx").stat().st_mtime_ns, (out / "original-kv.onnx").stat().st_mtime_ns) == exported


def test_prune_refits_the_projections_that_lost_inputs(tiny_dir, tmp_path):
    """The default --refit writes refit.npz and both pruned graphs carry exactly its weights
    (the refit itself is checked against numpy least squares in tests/calib/test_refit.py);
    --refit none leaves the plainly sliced weights, so the two differ only there."""
    from pangu_light.passes.rewrites.set_projection import load_projections

    common = [str(tiny_dir[0]), "--heads-per-group", "1", "--ffn", "40", *CALIB, "--no-eval"]
    assert main(["prune", *common, "-o", str(tmp_path / "refit")]) == 0
    assert main(["prune", *common, "--refit", "none", "-o", str(tmp_path / "plain")]) == 0
    projections = load_projections(tmp_path / "refit" / "refit.npz")
    assert len(projections) == 2 * 4  # o_proj and down_proj of each of the 4 layers lost inputs
    for name in ("pruned.onnx", "pruned-kv.onnx"):
        refit = ir.load(tmp_path / "refit" / name).graph.initializers
        plain = ir.load(tmp_path / "plain" / name).graph.initializers
        assert set(refit) == set(plain)
        for weight, (values, bias) in projections.items():
            assert bias is None
            np.testing.assert_array_equal(refit[weight].const_value.numpy(), values.astype(np.float32))
            assert not np.array_equal(refit[weight].const_value.numpy(), plain[weight].const_value.numpy())
        for other in set(refit) - set(projections):
            np.testing.assert_array_equal(refit[other].const_value.numpy(), plain[other].const_value.numpy())
    assert json.loads((tmp_path / "refit" / "summary.json").read_text())["refit"] == "refit"


def test_prune_refits_clap_receivers(tiny_dir, tmp_path):
    """With --clap, the receiver's o_proj (merged heads) is refit unless --clap-refit none (the fit
    itself is checked against numpy least squares in tests/calib/test_clap_refit.py); the choice is
    recorded in plan.json."""
    from pangu_light.passes.analysis.model_map import ModelMap
    from pangu_light.passes.rewrites.set_projection import load_projections

    common = [str(tiny_dir[0]), "--drop-layers", "1", "--clap", "--clap-groups", "sum", *CALIB, "--no-eval",
              "--no-kv-cache"]
    for target in ("own", "span", "none"):
        assert main(["prune", *common, "--clap-refit", target, "-o", str(tmp_path / target)]) == 0
    plan = load_plan(tmp_path / "own" / "plan.json")
    assert plan.targets["clap_refit"] == "own"
    (merge,) = plan.clap_merges
    assert any(layer != merge.into for layer, _ in merge.groups)  # "sum": the removed layer's groups too
    position = merge.into - (merge.removed < merge.into)
    weights = {}
    for target in ("own", "span", "none"):
        graph = ir.load(tmp_path / target / "pruned.onnx")
        value = ModelMap.from_model(graph).layers[position].attention.o.weight
        weights[target] = value.const_value.numpy()
        if target != "none":
            written = load_projections(tmp_path / target / "refit.npz")[value.name][0]
            np.testing.assert_array_equal(written.astype(np.float32), weights[target])
    assert not np.array_equal(weights["own"], weights["none"])
    assert not np.array_equal(weights["own"], weights["span"])


def test_prune_spreads_by_sensitivity(tiny_dir, tmp_path, monkeypatch):
    """--spread sensitivity reaches the planner with the Grams prune collected (the spread itself is
    checked in tests/calib/test_sensitivity.py), its probe runs on the calibration windows without
    tokenising the text again; without a refit it is one clear line."""
    from pangu_light.calib import calibrate

    drawn = []

    def counted(*args, **kwargs):
        drawn.append(args)
        return tokenise(*args, **kwargs)

    tokenise = calibrate.calibration_sequences
    monkeypatch.setattr(calibrate, "calibration_sequences", counted)
    out = tmp_path / "job"
    args = [str(tiny_dir[0]), "--params", "0.7", "--spread", "sensitivity", *CALIB, "--no-eval"]
    assert main(["prune", *args, "-o", str(out)]) == 0
    assert len(drawn) == 1
    plan = load_plan(out / "plan.json")
    assert plan.targets["spread"] == "sensitivity"
    assert abs(plan.estimate["parameter_ratio"] - 0.7) <= 0.01
    assert main(["prune", *args, "--refit", "none", "-o", str(tmp_path / "plain")]) == 2


def test_prune_spreads_a_budget_by_sensitivity_by_default(tiny_dir, tmp_path):
    """prune's --spread auto: a --params budget is spread by sensitivity (the layer probe written next
    to the plan, the same plan as --spread sensitivity); where the probe or the refit cannot run
    (--refit none, --uniform) the budget is spread hidden-light, as plan spreads it."""
    common = [str(tiny_dir[0]), "--params", "0.7", *CALIB, "--no-eval", "--no-kv-cache"]
    assert main(["prune", *common, "-o", str(tmp_path / "auto")]) == 0
    assert main(["prune", *common, "--spread", "sensitivity", "-o", str(tmp_path / "sensitivity")]) == 0
    auto, sensitivity = (load_plan(tmp_path / name / "plan.json") for name in ("auto", "sensitivity"))
    assert auto.targets["spread"] == "sensitivity" and (tmp_path / "auto" / "layer_probe.json").is_file()
    assert [(l.heads, l.ffn) for l in auto.layers] == [(l.heads, l.ffn) for l in sensitivity.layers]
    for extra, name in ((["--refit", "none"], "plain"), (["--uniform"], "uniform")):
        assert main(["prune", *common, *extra, "-o", str(tmp_path / name)]) == 0
        assert load_plan(tmp_path / name / "plan.json").targets["spread"] == "hidden-light"
        assert not (tmp_path / name / "layer_probe.json").exists()


def test_prune_auto_spread_falls_back_where_sensitivity_cannot_reach(tiny_dir, tmp_path, capsys):
    """A budget below what the sensitivity spread's floors keep (0.45 of this tiny llama: its hidden-light
    hidden size leaves the layers' floors above it; tests/calib/test_sensitivity.py checks where that
    holds): --spread auto plans it hidden-light without running the probe, an explicit --spread
    sensitivity is one line before the probe, not a stack trace after it."""
    common = [str(tiny_dir[0]), "--params", "0.45", *CALIB, "--no-eval", "--no-kv-cache"]
    assert main(["prune", *common, "-o", str(tmp_path / "auto")]) == 0
    plan = load_plan(tmp_path / "auto" / "plan.json")
    assert plan.targets["spread"] == "hidden-light" and not (tmp_path / "auto" / "layer_probe.json").exists()
    assert abs(plan.estimate["parameter_ratio"] - 0.45) <= 0.01
    capsys.readouterr()
    assert main(["prune", *common, "--spread", "sensitivity", "-o", str(tmp_path / "explicit")]) == 2
    err = capsys.readouterr().err
    assert "--spread sensitivity cannot reach --params 0.45" in err and "Traceback" not in err


def test_prune_selects_by_obs_with_the_grams_it_collected(tiny_dir, tmp_path):
    """--selection obs keeps the default's widths and fills them as calib.obs chooses from prune's
    own Grams (the choice itself is checked in tests/calib/test_obs.py); the plan records it."""
    common = [str(tiny_dir[0]), "--heads-per-group", "1", "--ffn", "40", *CALIB, "--no-eval", "--no-kv-cache"]
    assert main(["prune", *common, "-o", str(tmp_path / "scores")]) == 0
    assert main(["prune", *common, "--selection", "obs", "-o", str(tmp_path / "obs")]) == 0
    scores, obs = load_plan(tmp_path / "scores" / "plan.json"), load_plan(tmp_path / "obs" / "plan.json")
    assert obs.targets["selection"] == "obs" and obs.estimate == scores.estimate
    assert [len(l.ffn) for l in obs.layers] == [len(l.ffn) for l in scores.layers]
    assert [l.ffn for l in obs.layers] != [l.ffn for l in scores.layers]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["calibrate", "{graph}", "--data", "{small}", "--samples", "50", "--seq-len", "24", "-o", "{tmp}/s.npz"],
            "sequences of 24; asked for 50",
        ),
        (["calibrate", "{graph}", "-o", "{tmp}/s.txt"], "must end in .npz"),
        (["calibrate", "{graph}", "-o", "{graph}"], "never overwritten"),
        (["plan", "{tmp}/missing.npz", "-o", "{tmp}/p.json"], "not a statistics file"),
        (["compile", "{graph}", "--plan", "{tmp}/missing.json", "-o", "{tmp}/o.onnx"], "cannot read the plan"),
        (["compile", "{graph}", "-o", "{tmp}/o.onnx"], "one of --pipeline or --plan"),
        (["prune", "{dir}", "-o", "{tmp}/job"], "prune needs a target"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_graph, tiny_dir, tmp_path, capsys, argv, message):
    small = tmp_path / "small.txt"
    small.write_text("A short text.\n\nAnother short paragraph of text.\n")
    values = {"graph": str(tiny_graph), "dir": str(tiny_dir[0]), "tmp": str(tmp_path), "small": str(small)}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--params", "0"], "give the fraction of parameters to keep, in (0, 1]"),
        (["--params", "1.5"], "give the fraction of parameters to keep, in (0, 1]"),
        (["--params", "0.8", "--align", "0"], "--align must be at least 1"),
        (["--drop-layers", "-1"], "cannot drop -1 layers"),
        (["--params", "0.8", "--selection", "obs", "--refit", "none"], "it needs --refit refit"),
    ],
)
def test_prune_refuses_bad_targets_before_exporting(tiny_dir, tmp_path, capsys, monkeypatch, extra, message):
    """A ratio that keeps nothing is an error in a second, not after the export and calibration."""
    from pangu_light.tools import prune_cmd

    def no_export(*args, **kwargs):
        raise AssertionError("exported before checking the targets")

    monkeypatch.setattr(prune_cmd, "export_kinds", no_export)
    assert main(["prune", str(tiny_dir[0]), "-o", str(tmp_path / "job"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "job").exists()
