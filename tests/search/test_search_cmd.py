"""`pangu-light search` end to end on the tiny Llama (its cached exports, a character tokenizer):
the outputs are written, the chosen plan compiles with `compile --plan`, the front in
search.json is monotone, and a second search in OUTDIR measures nothing and reuses the proxies."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from pangu_light.passes.infra.plan import load_plan
from pangu_light.tools.cli import main

from reference import save_char_tokenizer


@pytest.fixture(scope="module")
def args(exported_graph, tmp_path_factory):
    _, original = exported_graph("llama")
    _, decode = exported_graph("llama", True)
    chars = tmp_path_factory.mktemp("chars")
    save_char_tokenizer(chars)
    out = tmp_path_factory.mktemp("search")
    return out, [
        "search", "--graph", str(original), "--kv-graph", str(decode), "--tokenizer", str(chars),
        "--target-speedup", "1.2", "--scale", "32", "--align", "8", "--design-points", "4",
        "--budget-minutes", "0.05", "--samples", "8", "--seq-len", "40", "--proxy-samples", "4",
        "--proxy-seq-len", "16", "--table-dir", str(out / "tables"), "--quiet", "-o", str(out / "run"),
    ]


def test_search_writes_a_plan_compile_accepts(args, exported_graph, tmp_path, capsys):
    out, argv = args
    assert main(argv) == 0
    printed = capsys.readouterr().out
    run = out / "run"
    assert {"plan.json", "front.md", "front.png", "search.json", "stats.npz", "grams.npz", "proxies.json",
            "rotation.npz"} <= {p.name for p in run.iterdir()}  # llama: auto rotates the hidden size
    report = json.loads((run / "search.json").read_text())
    chosen = report["chosen"]
    assert chosen["measured"] and chosen["speedup"] >= 1.2 and f"chosen: {chosen['label']}" in printed
    front = report["front"]
    assert [r["speedup"] for r in front] == sorted(r["speedup"] for r in front)
    assert [r["kl"] for r in front] == sorted(r["kl"] for r in front)
    assert "**(chosen)**" in (run / "front.md").read_text()
    plan = load_plan(run / "plan.json")
    assert plan.targets["search"]["label"] == chosen["label"]
    _, decode = exported_graph("llama", True)
    assert main(["compile", str(decode), "--plan", str(run / "plan.json"), "-o", str(tmp_path / "p.onnx")]) == 0
    assert len(ir.load(tmp_path / "p.onnx").graph.initializers) > 0

    # a second search in the same OUTDIR with no budget: the latency table and the proxies are
    # reused, nothing is measured, the same shape is chosen
    again = [("0" if a == "0.05" else a) for a in argv if a != "--quiet"]  # notes on: what was reused
    assert main(again) == 0
    printed = capsys.readouterr()
    assert "measured 0 new shapes" in printed.out
    assert "reusing the calibration" in printed.err and "rotation.npz: same graph and text" in printed.err
    assert json.loads((run / "search.json").read_text())["chosen"]["label"] == chosen["label"]
