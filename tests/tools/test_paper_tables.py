"""benchmarks/paper_tables.py end to end on a tiny model with tiny budgets: every file written,
and the numbers in the table are those of the graphs it compiled."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from families import tiny_model
from reference import save_char_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_tables.py"


def _script():
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_table3_on_a_tiny_model_writes_every_file(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    save_char_tokenizer(model_dir)
    out = tmp_path / "results"
    argv = ["table3", "-o", str(out), "--model", str(model_dir), "--params", "0.6", "--drop-layers", "1",
            "--calib-samples", "4", "--seq-len", "24", "--eval-samples", "2", "--tasks", "lambada,winogrande",
            "--limit", "2", "--quiet"]
    assert _script().main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"table3.md", "table3.json", "plan-minitron.json", "plan-clap.json",
                                              "plan-clap-slnp.json", "work"}
    assert [p.name for p in (out / "work").iterdir()] == ["orig.onnx"]  # pruned graphs deleted without --keep
    report = json.loads((out / "table3.json").read_text())
    rows = report["rows"]
    assert list(rows) == ["unpruned", "minitron", "+CLAP", "+CLAP+SLNP"]
    assert rows["unpruned"]["parameter_fraction"] == 1
    for name in ("minitron", "+CLAP", "+CLAP+SLNP"):
        assert rows[name]["parameter_fraction"] == pytest.approx(0.6, abs=0.01)
        assert rows[name]["targets"]["drop_layers"] == 1
    assert (rows["minitron"]["targets"]["clap"], rows["+CLAP"]["targets"]["slnp"]) == (False, False)
    assert rows["+CLAP+SLNP"]["targets"]["clap"] and rows["+CLAP+SLNP"]["targets"]["slnp"]
    plans = {name: json.loads((out / f"plan-{name}.json").read_text()) for name in ("minitron", "clap", "clap-slnp")}
    assert plans["minitron"]["drop_layers"] == plans["clap"]["drop_layers"] == plans["clap-slnp"]["drop_layers"]
    enabled = {name: (plan["clap"]["enabled"], plan["slnp"]["enabled"]) for name, plan in plans.items()}
    assert enabled == {"minitron": (False, False), "clap": (True, False), "clap-slnp": (True, True)}
    assert plans["minitron"]["clap"]["merges"] == [] and plans["clap"]["clap"]["merges"]
    hashes = {json.dumps(r["lm_eval"]["task_hashes"]) for r in rows.values()}
    assert len(hashes) == 1  # every graph scored on the same items
    for row in rows.values():
        assert set(row["lm_eval"]["results"]) == {"lambada", "winogrande"}
        assert row["perplexity"]["tokens"] == 2 * 23
    table = (out / "table3.md").read_text().splitlines()
    head = table.index(next(line for line in table if line.startswith("| row |")))
    assert table[head] == ("| row | parameters | held-out perplexity | lambada perplexity | lambada acc | "
                           "winogrande acc |")
    body = table[head + 2 : head + 6]
    assert [line.split(" | ")[0] for line in body] == ["| unpruned", "| minitron", "| +CLAP", "| +CLAP+SLNP"]
    for line, row in zip(body, rows.values(), strict=True):
        assert f"| {row['perplexity']['perplexity']:.2f} |" in line
    assert any(line.startswith("- command: `python benchmarks/paper_tables.py table3") for line in table)
