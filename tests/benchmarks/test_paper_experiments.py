"""benchmarks/paper_tables.py end to end on tiny models (llama for table 3 and figure 2, gemma3 for
table 4 and figure 3) with tiny budgets: every table and plot file written, and the numbers in
them are those of the graphs the experiment built (checked against the JSON, the plans and the
algebra each row claims: SLNP keeps ||g||, absorption scales by s_inv, ...)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from pangu_light.tools.cli import main as cli

from families import tiny_model
from reference import save_char_tokenizer

TINY = ["--calib-samples", "4", "--seq-len", "24", "--eval-samples", "2", "--tasks", "lambada,winogrande",
        "--limit", "2", "--quiet"]

pytestmark = [pytest.mark.tiny_budget, pytest.mark.slow]


def _script():
    return load_benchmark("paper_tables")


def _clap_llama():
    """The tiny llama with layer 0's v_proj times 3 and its o_proj / 3: the same function (so the same
    layers removed), its S_head (eq. 2, before o_proj) 3x higher, so that with prune's default
    --clap-margin (1.5) CLAP still moves its KV groups into layer 1 and prune refits that receiver."""
    import torch

    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        attention.v_proj.weight.mul_(3.0)
        attention.o_proj.weight.div_(3.0)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: HF directory} and a work folder holding their exports (what the experiments reuse)."""
    root = tmp_path_factory.mktemp("paper")
    work = root / "work"
    dirs = {}
    for family, model in (("llama", tiny_model("llama")), ("gemma3", tiny_model("gemma3")),
                          ("llama-clap", _clap_llama())):
        dirs[family] = root / f"tiny-{family}"
        model.save_pretrained(dirs[family])
        save_char_tokenizer(dirs[family])
        assert cli(["export", str(dirs[family]), "-o", str(work / f"tiny-{family}.onnx"), "--quiet"]) == 0
    return dirs, work


def _run(tiny, out: Path, *argv: str, model: str = "llama") -> None:
    dirs, work = tiny
    assert _script().main([*argv, "-o", str(out), "--model", str(dirs[model]), "--gemma-model",
                           str(dirs["gemma3"]), "--workdir", str(work), *TINY]) == 0


def _table(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("## ") and lines[2].startswith("- command: `python benchmarks/paper_tables.py")
    assert any(line.startswith("- versions: python") for line in lines)
    assert any(line.startswith("- machine: ") for line in lines)
    return lines


def _body(lines: list[str]) -> list[str]:
    head = lines.index(next(line for line in lines if line.startswith("| row |")))
    return [line for line in lines[head + 2 :] if line.startswith("|")]


def test_table3_every_row_one_shot(tiny, tmp_path):
    out = tmp_path / "r"
    _run(tiny, out, "table3", "--params", "0.45", "--drop-layers", "2", model="llama-clap")
    assert {p.name for p in out.iterdir()} == {"table3.md", "table3.json", "plan-minitron.json", "plan-clap.json",
                                              "plan-clap-slnp.json", "plan-prune-default.json",
                                              "plan-prune-default-clap.json"}
    rows = json.loads((out / "table3.json").read_text())["rows"]
    assert list(rows) == ["unpruned", "minitron", "+CLAP", "+CLAP+SLNP", "prune-default", "prune-default+CLAP"]
    assert rows["unpruned"]["parameter_fraction"] == 1
    plans = {n: json.loads((out / f"plan-{n}.json").read_text()) for n in ("minitron", "clap", "clap-slnp",
                                                                           "prune-default", "prune-default-clap")}
    assert len({json.dumps(p["drop_layers"]) for p in plans.values()}) == 1
    assert len(plans["minitron"]["drop_layers"]) == 2
    assert plans["minitron"]["clap"]["merges"] == [] and plans["clap"]["clap"]["merges"]
    enabled = {n: (p["clap"]["enabled"], p["slnp"]["enabled"]) for n, p in plans.items()
               if not n.startswith("prune-default")}
    assert enabled == {"minitron": (False, False), "clap": (True, False), "clap-slnp": (True, True)}
    # the baseline slices and removes plainly; prune's default rotates and refits, without CLAP;
    # prune --clap adds the project's CLAP (prune's margin, not the paper's 1) and refits its receivers
    assert [plans[n]["targets"]["hidden_method"] for n in plans] == ["select"] * 3 + ["rotate"] * 2
    assert not plans["prune-default"]["clap"]["enabled"] and plans["prune-default-clap"]["clap"]["enabled"]
    assert [plans[n]["targets"]["refit"] for n in plans] == ["none", "none", "none", "refit", "refit"]
    assert [plans[n]["targets"]["clap_margin"] for n in plans] == [1.0, 1.0, 1.0, 1.5, 1.5]
    assert [plans[n]["targets"].get("clap_refit") for n in plans] == [None] * 4 + ["next"]
    assert rows["prune-default+CLAP"]["clap_refit"] == "next" and "clap_refit" not in rows["prune-default"]
    merges = plans["prune-default-clap"]["clap"]["merges"]
    assert any(layer != merge["into"] for merge in merges for layer, _ in merge["groups"])  # a receiver to refit
    # one shape for every row: prune's default spread of the same budget (auto: sensitivity, one layer probe)
    assert {p["targets"]["spread"] for p in plans.values()} == {"sensitivity"}
    assert len({len(p["hidden"]["keep"]) for p in plans.values()}) == 1
    assert len({json.dumps([len(layer["ffn"]) for layer in p["layers"]]) for p in plans.values()}) == 1
    assert len({json.dumps([len(layer["heads"]) for layer in p["layers"]]) for p in plans.values()}) == 1
    for name in ("minitron", "+CLAP", "+CLAP+SLNP", "prune-default", "prune-default+CLAP"):
        assert rows[name]["parameter_fraction"] == pytest.approx(0.45, abs=0.01)
    # one-shot rows differ from each other (CLAP and SLNP change weights), and every row saw the same items
    assert len({r["perplexity"]["perplexity"] for r in rows.values()}) == 6
    assert len({json.dumps(r["lm_eval"]["task_hashes"]) for r in rows.values()}) == 1
    body = _body(_table(out / "table3.md"))
    assert [line.split(" | ")[0] for line in body] == [f"| {name}" for name in rows]
    for line, row in zip(body, rows.values(), strict=True):
        assert f"| {row['perplexity']['perplexity']:.2f} |" in line
        assert f"{100 * row['lm_eval']['results']['winogrande']['acc,none']:.1f} ±" in line
    assert [p.name for p in tiny[1].glob("*.onnx")] != [] and not list(tiny[1].glob("prune-default*.onnx"))
    logged = [json.loads(line) for line in (tiny[1] / "scored-rows.jsonl").read_text().splitlines()]
    assert [entry["perplexity"] for entry in logged[-6:]] == [r["perplexity"] for r in rows.values()]
    assert "- prune-default+CLAP: `pangu-light prune --params 0.45 --drop-layers 2 --clap`'s defaults" in (
        out / "table3.md").read_text()


@pytest.mark.parametrize("row, name, options", [("prune-default", "prune-default", []),
                                                ("prune-default+CLAP", "prune-default-clap", ["--clap"])])
def test_table3_prune_rows_are_what_prune_builds(tiny, tmp_path, row, name, options):
    """The row's graph has the function of ``pangu-light prune [--clap]``'s pruned.onnx for the same budget
    and calibration windows (the plans agree, and ORT gives the same logits up to float32 rounding). The
    model's layer 0 outscores its receiver by more than prune's CLAP margin (1.5; the paper's 1 would also
    move layer 3's groups at this shape), so prune --clap refits a receiver's o_proj here."""
    import onnxruntime as ort

    dirs, work = tiny
    out, job = tmp_path / "r", tmp_path / "prune"
    _run(tiny, out, "table3", "--params", "0.45", "--drop-layers", "2", "--table3-rows", row, "--tasks", "",
         "--keep", model="llama-clap")
    assert cli(["prune", str(dirs["llama-clap"]), "--params", "0.45", "--drop-layers", "2", *options, "-o", str(job),
                "--data", "wiki", "--samples", "4", "--seq-len", "24", "--no-eval", "--no-kv-cache", "--quiet"]) == 0
    ours, theirs = (json.loads(p.read_text()) for p in (out / f"plan-{name}.json", job / "plan.json"))
    for key in ("drop_layers", "layers", "clap", "slnp", "post_norms"):
        assert ours[key] == theirs[key], key
    assert ours["hidden"]["keep"] == theirs["hidden"]["keep"]
    assert ours["hidden"]["method"] == theirs["hidden"]["method"] == "rotate"
    assert ours["targets"] == theirs["targets"]  # clap_margin, refit and clap_refit included
    if options:
        assert ours["targets"]["clap_refit"] == "next"
        assert [m["groups"] for m in ours["clap"]["merges"]] == [[[0, 0], [0, 1]], [[2, 0], [2, 1]]]
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 12))
    logits = []
    for graph in (work / f"{name}.onnx", job / "pruned.onnx"):
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(graph), session_options, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids}
        if "attention_mask" in [i.name for i in session.get_inputs()]:
            feeds["attention_mask"] = np.ones_like(ids)
        logits.append(session.run(["logits"], feeds)[0])
    scale = float(np.abs(logits[1]).max())
    assert scale > 0 and np.abs(logits[0] - logits[1]).max() <= 1e-5 * scale
    (work / f"{name}.onnx").unlink()


def test_table3_recovery_row_is_the_recovered_graph(tiny, tmp_path):
    out = tmp_path / "r"
    _run(tiny, out, "table3", "--params", "0.6", "--drop-layers", "1", "--table3-rows", "+CLAP+SLNP",
         "--recover-steps", "2", "--recover-with", "distill", "--train-samples", "8",
         "--recover-eval-samples", "2", "--recover-args=--no-bf16 --lr 3e-4")
    report = json.loads((out / "table3.json").read_text())
    assert list(report["rows"]) == ["unpruned", "+CLAP+SLNP", "+CLAP+SLNP + recovery"]
    recovered = report["rows"]["+CLAP+SLNP + recovery"]
    summary = json.loads((tiny[1] / "recover-clap-slnp" / "summary.json").read_text())
    assert summary["steps"] == 2  # the same optimizer steps for every row, whatever the load
    assert summary["fingerprint"]["bf16"] is False and summary["fingerprint"]["lr"] == 3e-4  # --recover-args
    assert recovered["graph"] == "distilled.onnx"
    assert recovered["parameters"] == report["rows"]["+CLAP+SLNP"]["parameters"]  # same shape, trained weights
    assert recovered["perplexity"] != report["rows"]["+CLAP+SLNP"]["perplexity"]
    assert "`pangu-light distill --no-bf16 --lr 3e-4` for 2 optimizer steps" in (out / "table3.md").read_text()


def test_table4_post_norm_rows(tiny, tmp_path):
    out = tmp_path / "r"
    _run(tiny, out, "table4", "--absorb-max-spread", "0.15")
    assert {p.name for p in out.iterdir()} == {"table4.md", "table4.json"}
    rows = json.loads((out / "table4.json").read_text())["rows"]
    assert list(rows) == ["sandwich", "direct removal", "absorption", "partial absorption"]
    left = {name: r["post_norms_left"] for name, r in rows.items()}
    assert left["sandwich"] == rows["sandwich"]["post_norms"] == 8  # 4 layers x (post_attn, post_ffn)
    assert left["direct removal"] == left["absorption"] == 0
    assert 0 <= left["partial absorption"] <= 8
    assert rows["sandwich"]["parameter_fraction"] == 1
    # the gammas of the removed post-norms are the only parameters that go
    assert rows["sandwich"]["parameters"] - rows["absorption"]["parameters"] == 8 * 64
    assert rows["direct removal"]["perplexity"] != rows["absorption"]["perplexity"]
    body = _body(_table(out / "table4.md"))
    for line, row in zip(body, rows.values(), strict=True):
        assert f"| {row['perplexity']['perplexity']:.2f} |" in line


def test_fig2_points_and_plot(tiny, tmp_path):
    out = tmp_path / "r"
    _run(tiny, out, "fig2", "--fig2-levels", "0.8:0,0.6:1", "--fig2-methods", "minitron,prune-default",
         "--latency-seq", "16", "--repeats", "3")
    assert {p.name for p in out.iterdir()} == {"fig2.md", "fig2.json", "fig2.png"}
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "fig2.json").read_text())
    points = report["points"]
    assert [(p["level"], p["method"]) for p in points] == [("0.8:0", "minitron"), ("0.8:0", "prune-default"),
                                                           ("0.6:1", "minitron"), ("0.6:1", "prune-default")]
    methods = [(p["targets"]["hidden_method"], p["refit"]) for p in points]
    assert methods == [("select", "none"), ("rotate", "refit")] * 2
    base = report["unpruned"]
    for p in points:
        assert p["speedup"] > 0 and p["median_ms"] > 0
        retained = base["perplexity"]["perplexity"] / p["perplexity"]["perplexity"]
        assert p["perplexity_retained"] == pytest.approx(retained)
        ratios = [p["lm_eval"]["results"][t]["acc,none"] / base["lm_eval"]["results"][t]["acc,none"]
                  for t in ("lambada", "winogrande") if base["lm_eval"]["results"][t]["acc,none"] > 0]
        assert p["accuracy_retained"] == (pytest.approx(np.mean(ratios)) if ratios else None)
    assert points[0]["parameter_fraction"] == pytest.approx(0.8, abs=0.01)
    assert points[2]["parameter_fraction"] == pytest.approx(0.6, abs=0.01)
    lines = (out / "fig2.md").read_text().splitlines()
    assert sum(line.startswith("| 0.") for line in lines) == 4


def test_fig3_gamma_statistics_follow_slnp_and_absorption(tiny, tmp_path):
    out = tmp_path / "r"
    _run(tiny, out, "fig3", "--fig3-params", "0.7")
    assert {p.name for p in out.iterdir()} == {"fig3.md", "fig3.json", "fig3.png"}
    assert (out / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "fig3.json").read_text())
    assert report["spread"] == "sensitivity"  # prune's default widths, as the other experiments use
    series = report["series"]
    for role in ("post_attn", "post_ffn"):
        original, pruned = series[f"original/{role}"], series[f"pruned + SLNP/{role}"]
        absorbed = series[f"absorbed (s_inv x g')/{role}"]
        assert original["layers"] == pruned["layers"] == absorbed["layers"] == [0, 1, 2, 3]
        assert set(original["channels"]) == {64} and set(pruned["channels"]) == {report["hidden"][1]} != {64}
        for i in range(4):
            # SLNP (eq. 6) keeps each gamma's L2 norm: n (mean^2 + std^2) before and after, up to the
            # float32 storage of w = g - 1 (each g^2 moves by at most |g| |w| eps; |w| < 2 |g| here)
            before = original["channels"][i] * (original["mean"][i] ** 2 + original["std"][i] ** 2)
            after = pruned["channels"][i] * (pruned["mean"][i] ** 2 + pruned["std"][i] ** 2)
            assert after == pytest.approx(before, rel=4 * float(np.finfo(np.float32).eps))
            sliced = pruned["channels"][i] / original["channels"][i] * before  # what a plain slice would keep
            assert after != pytest.approx(sliced, rel=1e-3)
            # absorption scales the pruned gamma by the calibrated s_inv of its norm
            s = absorbed["s_inv"][i]
            assert s > 0 and absorbed["mean"][i] == pytest.approx(s * pruned["mean"][i], rel=1e-12)
            assert absorbed["std"][i] == pytest.approx(s * pruned["std"][i], rel=1e-12)
            assert math.isclose(absorbed["cv"][i], pruned["cv"][i], rel_tol=1e-9)
