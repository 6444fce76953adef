"""runtime.benchmark and runtime.machine: workload lengths and scaling, the alternating order of
rounds with warm-up excluded, stats over rounds, the no-cache check, the peak-memory probe and
the machine description."""

from __future__ import annotations

import numpy as np
import pytest

from pangu_light.reports.machine import format_machine
from pangu_light.runtime import benchmark
from pangu_light.runtime.benchmark import (
    Request,
    Stat,
    check_workload,
    graph_kind,
    make_prompts,
    measure,
    probe_memory,
    summarize,
    workload_requests,
)
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.generate import GenerationResult
from pangu_light.runtime.machine import describe_machine, load_average
from pangu_light.runtime.session import create_session


def test_paper_workload_and_scale():
    assert workload_requests("paper") == [Request(128, 1024), Request(256, 2048)]
    assert workload_requests("paper", 8) == [Request(16, 128), Request(32, 256)]
    assert workload_requests("paper", 3) == [Request(43, 342), Request(86, 683)]  # rounded up
    assert workload_requests("paper", 4096) == [Request(1, 1), Request(1, 1)]
    assert workload_requests("prefill", 8) == [Request(16, 1), Request(32, 1)]
    assert workload_requests("decode", 2) == [Request(64, 512)]
    with pytest.raises(RuntimeUserError, match="paper, prefill, decode"):
        workload_requests("chat")
    with pytest.raises(RuntimeUserError, match="at least 1"):
        workload_requests("paper", 0)


def test_prompts_are_seeded_and_in_range():
    requests = [Request(3, 2), Request(5, 2)]
    prompts = make_prompts(40, requests, batch=2, seed=1)
    assert [np.shape(p) for p in prompts] == [(2, 3), (2, 5)]
    assert all(0 <= t < 40 for batch in prompts for row in batch for t in row)
    assert make_prompts(40, requests, 2, seed=1) == prompts != make_prompts(40, requests, 2, seed=2)


def test_rounds_alternate_and_warmup_is_dropped(monkeypatch):
    calls = []

    def fake_run(info, kind, prompts, request):
        calls.append(info)
        seconds = {"A": 0.2, "B": 0.1}[info] * (1 + len(calls) / 100)
        return GenerationResult([[1] * request.output_tokens], seconds, seconds * 4, request.output_tokens - 1, 1)

    monkeypatch.setattr(benchmark, "run_request", fake_run)
    requests = [Request(2, 3), Request(4, 5)]
    rounds = measure(["A", "B"], ["decode", "decode"], requests, [[[1, 2]], [[1, 2, 3, 4]]], repeats=3, warmup=2)
    # Request by request, the graphs alternate; the order flips every round.
    assert calls == ["A", "B", "A", "B", "B", "A", "B", "A", "A", "B", "A", "B", "B", "A", "B", "A", "A", "B", "A", "B"]
    assert [len(r) for r in rounds] == [3, 3]  # the 2 warm-up rounds are gone
    first_measured = rounds[0][0]  # A's calls 9 and 11 (1-based) in the third round
    assert first_measured.prefill_ms == pytest.approx([200 * 1.09, 200 * 1.11])
    assert first_measured.mix_prefill_ms == pytest.approx(200 * 1.10)
    assert first_measured.mix_decode_tokens_per_second == pytest.approx(
        (2 + 4) / (0.8 * 1.09 + 0.8 * 1.11)
    )
    assert first_measured.mix_throughput_tokens_per_second == pytest.approx((3 + 5) / (1.0 * 1.09 + 1.0 * 1.11))
    summary = summarize(rounds[1], requests)
    assert len(summary["prefill_ms"].samples) == 3
    assert summary["requests"][1]["input_tokens"] == 4
    assert summary["prefill_ms"].median == pytest.approx(np.median([r.mix_prefill_ms for r in rounds[1]]))


def test_stat():
    stat = Stat.of([4.0, 1.0, 3.0, 2.0, None])
    assert (stat.median, stat.q1, stat.q3, stat.min, stat.max) == (2.5, 1.75, 3.25, 1.0, 4.0)
    assert stat.samples == [4.0, 1.0, 3.0, 2.0]
    assert Stat.of([None, None]) is None


def test_decoding_workloads_need_decode_graphs(exported_graph):
    _, no_cache = exported_graph("llama", False)
    _, decode = exported_graph("llama", True)
    kinds = [graph_kind(create_session(p, provider="cpu").session) for p in (decode, no_cache)]
    assert kinds == ["decode", "no-cache"]
    with pytest.raises(RuntimeUserError) as error:
        check_workload(["a.onnx", "b.onnx"], kinds, "paper", workload_requests("paper", 64))
    assert "b.onnx is a no-cache graph" in str(error.value) and "--kv-cache" in str(error.value)
    check_workload(["a.onnx", "b.onnx"], kinds, "prefill", workload_requests("prefill", 64))


def test_no_cache_prefill_runs_one_forward(exported_graph):
    _, no_cache = exported_graph("qwen2", False)
    info = create_session(no_cache, provider="cpu")
    rounds = measure([info], ["no-cache"], [Request(3, 1)], [[[5, 6, 7], [8, 9, 10]]], repeats=2, warmup=0)
    assert rounds[0][0].mix_decode_tokens_per_second is None
    assert rounds[0][0].mix_prefill_ms > 0


def test_probe_memory(exported_graph):
    _, path = exported_graph("llama", True)
    memory = probe_memory(str(path), [Request(4, 3)], batch=2, session_options={"provider": "cpu", "threads": 1})
    assert memory["peak_rss_bytes"] >= memory["baseline_rss_bytes"] > 10 * 2**20  # Python + onnxruntime
    assert memory["graph_peak_bytes"] == memory["peak_rss_bytes"] - memory["baseline_rss_bytes"]
    with pytest.raises(RuntimeUserError, match="--no-memory"):
        probe_memory(str(path) + ".missing", [Request(4, 3)], batch=1, session_options={"provider": "cpu"})


def test_machine_description():
    machine = describe_machine()
    assert machine["logical_cores"] >= 1 and machine["usable_cores"] >= 1
    assert machine["ram_bytes"] > 2**28
    assert "CPUExecutionProvider" in machine["available_providers"]
    assert machine["cpu_model"] and machine["os"] and machine["onnxruntime"]
    line = format_machine(machine)
    assert machine["cpu_model"] in line and "GiB RAM" in line and f"onnxruntime {machine['onnxruntime']}" in line
    load = load_average()
    assert load is None or (len(load) == 3 and all(value >= 0 for value in load))
