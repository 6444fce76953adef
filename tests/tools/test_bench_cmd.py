"""`pangu-light bench` on tiny graphs with a tiny workload: the JSON report has exactly the
fields the README documents, its costs equal GraphStats summed position by position, the
table and chart are written, no-cache graphs are refused where decoding is needed, and a
provider fall-back is flagged. Nothing here asserts a speed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnxruntime as ort
import pytest

from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.infra.graph_io import load_model
from pangu_light.tools import cli

from reference import compile_graph

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Benchmark reports (pangu-light bench)"
STAT_KEYS = {"median", "q1", "q3", "min", "max", "samples"}
TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "object": dict}


@pytest.fixture(autouse=True)
def only_bench_command(monkeypatch):
    # Other command modules are written alongside this one; keep the table to the one under test.
    monkeypatch.setattr(cli, "COMMANDS", {"bench": "pangu_light.tools.bench_cmd"})


@pytest.fixture(scope="module")
def graphs(exported_graph, tmp_path_factory):
    """The tiny Llama decode graph and the same with layer 1 dropped."""
    _, path = exported_graph("llama", True)
    pruned = tmp_path_factory.mktemp("bench") / "llama-kv-drop1.onnx"
    compile_graph(path, "drop-layers{layers=[1]}", pruned)
    return path, pruned


def documented_fields() -> dict[str, str]:
    """``path -> type`` from the README section (which must be the last one)."""
    text = README.read_text()
    assert SECTION in text, "the README lacks the benchmark report section"
    section = text.split(SECTION, 1)[1]
    assert "\n## " not in section, "the benchmark report section must be the README's last"
    fields = dict(re.findall(r"^- `([^`]+)` \((\w+)\)", section, flags=re.MULTILINE))
    assert len(fields) > 40
    return fields


def flatten(value, prefix: str, documented: dict[str, str], out: dict[str, object], item: bool = False) -> None:
    """Every path in a report: objects by key, lists of objects as ``name[]``; stats and free
    objects (type ``object`` without documented children) are leaves."""
    if prefix and not item:
        out.setdefault(prefix, value)
    kind = documented.get(prefix)
    if kind == "stat" or value is None:
        return
    if isinstance(value, dict):
        children = [p for p in documented if p.startswith(prefix + ".")] if prefix else list(documented)
        if prefix and kind == "object" and not children:
            return
        for key, child in value.items():
            flatten(child, f"{prefix}.{key}" if prefix else key, documented, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for element in value:
            flatten(element, prefix + "[]", documented, out, item=True)


def check_schema(report: dict) -> None:
    documented = documented_fields()
    found: dict[str, object] = {}
    flatten(report, "", documented, found)
    assert sorted(set(found) - set(documented)) == [], "fields missing from the README"
    def under_null(path: str) -> bool:  # the children of a null object are absent, not missing
        parts = path.split(".")
        return any(found.get(".".join(parts[:i]), 0) is None for i in range(1, len(parts)))

    missing = [p for p in set(documented) - set(found) if not under_null(p)]
    assert sorted(missing) == [], "documented fields missing from the report"
    for path, value in found.items():
        kind = documented[path]
        if value is None:
            continue
        if kind == "stat":
            assert set(value) == STAT_KEYS, path
            assert value["min"] <= value["q1"] <= value["median"] <= value["q3"] <= value["max"], path
        else:
            assert isinstance(value, TYPES[kind]) and not (kind != "bool" and isinstance(value, bool)), path


def cost_by_positions(path, requests, batch: int) -> dict[str, int]:
    """The workload's FLOPs and decode bytes summed position by position with GraphStats at
    each context: an independent check of the closed forms in reports.bench_cost.workload_cost."""
    model = load_model(path)
    stats = {}

    def at(context: int) -> GraphStats:
        if context not in stats:
            stats[context] = GraphStats.from_model(model, context=context)
        return stats[context]

    prefill = decode_flops = decode_bytes = 0
    for n, m in requests:
        prefill += batch * sum(at(i + 1).flops_per_token for i in range(n))
        for k in range(1, m):
            decode_flops += batch * at(n + k).flops_per_token
            unit = at(n + k).bytes_per_token_decode()
            decode_bytes += unit.weight_bytes + batch * unit.kv_cache_bytes
    return {"prefill_flops": prefill, "decode_flops": decode_flops, "decode_bytes": decode_bytes}


def test_paper_workload_report(graphs, tmp_path, capsys):
    original, pruned = graphs
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main([
        "bench", str(original), str(pruned), "--workload", "paper", "--scale", "128", "--batch", "2",
        "--repeats", "3", "--warmup", "1", "--threads", "1", "--no-spinning", "--provider", "cpu",
        "--json", str(out_json), "--plot", str(out_png),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out_json.read_text())
    check_schema(report)

    assert report["workload"]["requests"] == [
        {"input_tokens": 1, "output_tokens": 8}, {"input_tokens": 2, "output_tokens": 16},
    ]
    assert report["session"]["threads"] == 1 and report["session"]["requested_provider"] == "cpu"
    assert report["session"]["spinning"] is False
    assert report["machine"]["onnxruntime"] == ort.__version__
    base, other = report["graphs"]
    for graph in (base, other):
        assert graph["providers"] == ["CPUExecutionProvider"] and graph["fell_back"] is False
        assert graph["graph_kind"] == "decode"
        assert len(graph["prefill_ms"]["samples"]) == 3
        assert graph["peak_memory"]["peak_rss_bytes"] > graph["peak_memory"]["baseline_rss_bytes"]
        assert graph["cost"]["decode_tokens"] == 2 * (7 + 15)
    for graph, path in ((base, original), (other, pruned)):
        expected = cost_by_positions(path, [(1, 8), (2, 16)], batch=2)
        assert {key: graph["cost"][key] for key in expected} == expected

    # The first graph against itself: every per-round ratio is 1.
    for metric in ("prefill", "decode", "throughput"):
        assert base["speedup"][metric]["measured"]["samples"] == [1.0, 1.0, 1.0]
        assert base["speedup"][metric]["ideal"] == pytest.approx(1.0)
    speedup = other["speedup"]
    assert speedup["baseline"] == str(original)
    assert speedup["prefill"]["ideal"] == base["cost"]["prefill_flops"] / other["cost"]["prefill_flops"]
    assert speedup["decode"]["ideal"] == base["cost"]["decode_bytes"] / other["cost"]["decode_bytes"]
    assert speedup["decode"]["ideal_from_flops"] == base["cost"]["decode_flops"] / other["cost"]["decode_flops"]
    assert 1.0 < speedup["decode"]["ideal"] < 4 / 3  # one of 4 layers gone; embedding and head stay
    assert speedup["decode"]["fraction_of_ideal"] == pytest.approx(
        speedup["decode"]["measured"]["median"] / speedup["decode"]["ideal"]
    )
    lo, hi = sorted((speedup["prefill"]["ideal"], speedup["decode"]["ideal"]))
    assert lo <= speedup["throughput"]["ideal"] <= hi  # a time-weighted mix of the two

    table = captured.out
    assert f"machine: {report['machine']['cpu_model']}" in table
    assert "threads: 1 (no spinning)" in table and "load average" in table
    assert original.name in table and pruned.name in table and f"speedup over {original.name}" in table
    assert re.search(r"decode\s+\d+\.\d\dx \[", table)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


def test_prefill_on_a_no_cache_graph_and_json_to_stdout(exported_graph, capsys):
    _, no_cache = exported_graph("llama", False)
    rc = cli.main(["bench", str(no_cache), "--workload", "prefill", "--scale", "64", "--repeats", "2",
                   "--provider", "cpu", "--no-memory", "--json", "-"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    check_schema(report)
    graph = report["graphs"][0]
    assert graph["graph_kind"] == "no-cache" and graph["peak_memory"] is None
    assert graph["decode_tokens_per_second"] is None and graph["cost"]["decode_tokens"] == 0
    assert graph["prefill_ms"]["median"] > 0


@pytest.mark.parametrize("workload", ["paper", "decode"])
def test_decoding_workload_refuses_no_cache_graph(graphs, exported_graph, workload, capsys):
    _, no_cache = exported_graph("llama", False)
    rc = cli.main(["bench", str(graphs[0]), str(no_cache), "--workload", workload, "--scale", "64",
                   "--provider", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ")
    assert f"{no_cache} is a no-cache graph" in err and "--kv-cache" in err and "--workload prefill" in err


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is present here")
def test_provider_fall_back_is_flagged(graphs, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", str(graphs[0]), "--workload", "decode", "--scale", "256", "--repeats", "1",
                   "--warmup", "0", "--provider", "cuda", "--no-memory", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    graph = json.loads(out_json.read_text())["graphs"][0]
    assert graph["fell_back"] is True and graph["providers"] == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in graph["provider_warnings"][0]
    assert "CPU (FELL BACK)" in out and "warning:" in out


@pytest.mark.parametrize(
    "options, message",
    [
        (["--scale", "0"], "scale must be a whole number of at least 1"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--threads", "0"], "threads must be at least 1"),
        (["--provider", "tpu"], "unknown provider 'tpu'"),
    ],
)
def test_bad_options_are_one_line_errors(graphs, options, message, capsys):
    rc = cli.main(["bench", str(graphs[0]), "--no-memory", *options])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
