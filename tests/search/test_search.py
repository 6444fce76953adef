"""The shape search on the tiny Llama: the latency table is reused (a second search measures
nothing), the front is monotone, the chosen plan reaches the target when `bench` measures it
afterwards, and the clear-error cases. Speeds are only compared with a bound taken from the
measurements' own run-to-run spread."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.gram import collect_grams
from pangu_light.calib.stats import calibrate
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.runtime.benchmark import workload_requests
from pangu_light.search import driver
from pangu_light.search.build import compile_candidate
from pangu_light.search.candidates import generate_candidates, shape_key
from pangu_light.search.driver import SearchConfig, pareto_front, run_search
from pangu_light.search.latency import LatencyTable, file_digest, table_key
from pangu_light.tools.cli import main

TARGET = 1.2  # the tiny model reaches it by dropping layers (about 1.4x and more measured)
GRID = dict(hidden_fractions=(1.0, 0.5), ffn_fractions=(1.0, 0.5), drop_fractions=(0.0, 0.5), params_levels=(0.6,))


@pytest.fixture(scope="module")
def setting(exported_graph):
    _, original = exported_graph("llama")
    _, decode = exported_graph("llama", True)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 160, (12, 40))
    batches = [(ids[i: i + 4], np.ones_like(ids[i: i + 4])) for i in range(0, 12, 4)]
    stats, grams = calibrate(original, batches), collect_grams(original, batches)
    model_map = ModelMap.from_model(ir.load(original))
    every = generate_candidates(model_map, stats, align=8, **GRID)
    uniform = [c for c in every if c.kind == "uniform"]
    candidates = [c for c in every if c.kind == "spread"] + uniform[::3]  # a third of the grid: quicker
    return dict(original=original, decode=decode, model_map=model_map, candidates=candidates, grams=grams,
                proxy=rng.integers(3, 160, (4, 16)), proxy_cache={})


def search(setting, table_dir, target=TARGET):
    requests = workload_requests("paper", 32)
    table = LatencyTable(table_key(provider="cpu", model_digest=file_digest(setting["decode"]), workload="paper",
                                   scale=32, batch=1, threads=1), table_dir)
    config = SearchConfig(target=target, requests=requests, repeats=3, budget_seconds=600, design_points=4,
                          session_options=dict(provider="cpu", threads=1, strict=True), threads=1, quiet=True)
    result = run_search(original=setting["original"], timing_graph=setting["decode"],
                        candidates=setting["candidates"], identity=PrunePlan.identity(setting["model_map"]),
                        head_dim=16, grams=setting["grams"], proxy_sequences=setting["proxy"], table=table,
                        config=config, proxy_cache=setting["proxy_cache"])
    return result, table


@pytest.fixture(scope="module")
def first(setting, tmp_path_factory):
    table_dir = tmp_path_factory.mktemp("tables")
    result, table = search(setting, table_dir)
    return result, table, table_dir


def test_a_second_search_measures_nothing_it_knows(setting, first, monkeypatch):
    result, table, table_dir = first
    assert result.measured_now == table.measured_now > 0
    calls = []
    monkeypatch.setattr(driver, "measure_speedups", lambda *a, **k: calls.append(a) or [])
    again, table_again = search(setting, table_dir)
    assert calls == [] and again.measured_now == 0
    assert again.chosen.key == result.chosen.key
    assert table_again.entries == table.entries


def test_the_front_is_monotone_and_undominated(first):
    result = first[0]
    front = pareto_front(result.rows)
    assert len(front) >= 2
    speeds, kls = [r["speedup"] for r in front], [r["kl"] for r in front]
    assert speeds == sorted(speeds) and kls == sorted(kls)
    candidates = [r for r in result.rows if r.get("kl") is not None and r["measured"]]
    for r in candidates:  # every measured shape with a proxy is on the front or beaten on both axes
        assert r in front or any(f["speedup"] >= r["speedup"] and f["kl"] <= r["kl"] for f in front)


def test_pareto_front_on_known_points():
    rows = [{"label": k, "speedup": s, "kl": q, "measured": m} for k, s, q, m in [
        ("a", 1.2, 0.1, True), ("b", 1.5, 0.3, True), ("c", 1.4, 0.4, True), ("d", 2.0, 0.2, False),
        ("e", 1.8, 0.5, True)]]
    assert [r["label"] for r in pareto_front(rows)] == ["a", "b", "e"]


def test_the_chosen_plan_reaches_the_target_under_bench(setting, first, tmp_path, capsys):
    result = first[0]
    chosen = result.chosen_row
    assert chosen["measured"] and chosen["speedup"] >= TARGET
    assert chosen["kl"] == min(r["kl"] for r in result.rows if r.get("kl") is not None and r["speedup"] >= TARGET)
    pruned = compile_candidate(setting["decode"], result.chosen.plan, tmp_path / "chosen-kv.onnx")
    report_path = tmp_path / "bench.json"
    assert main(["bench", str(setting["decode"]), str(pruned), "--workload", "paper", "--scale", "32",
                 "--repeats", "5", "--threads", "1", "--no-memory", "--json", str(report_path)]) == 0
    measured = json.loads(report_path.read_text())["graphs"][1]["speedup"]["throughput"]["measured"]
    search_samples = first[1].entries[result.chosen.key]["samples"]
    spread = max((max(s) - min(s)) / np.median(s) for s in (measured["samples"], search_samples))
    assert measured["median"] >= TARGET * (1 - spread), (measured, search_samples)


def test_an_unreachable_target_is_one_clear_line(setting, first):
    with pytest.raises(PanguLightError, match=r"no candidate reaches a 50x speedup") as error:
        search(setting, first[2], target=50.0)
    assert "\n" not in str(error.value)


def test_an_unavailable_provider_is_one_clear_line(tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    assert main(["search", "smollm2-135m", "--target-speedup", "1.6", "--provider", "cuda", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: provider cuda is not available here") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_shape_key_ignores_which_layers_and_indices(setting):
    plan = PrunePlan.identity(setting["model_map"])
    other = PrunePlan.identity(setting["model_map"])
    plan.drop_layers, other.drop_layers = [1], [2]
    plan.layers[0].ffn, other.layers[0].ffn = list(range(48)), list(range(48, 96))
    assert shape_key(plan) == shape_key(other)
    other.layers[0].ffn = list(range(40))
    assert shape_key(plan) != shape_key(other)


def test_rotate_candidates_share_shapes_and_need_their_rotation(setting, tmp_path):
    """Rotated candidates have the select candidates' shapes (one latency table serves both), cut
    the hidden size by rotation, and their refit refuses to run without the rotation."""
    from pangu_light.calib.rotation import collect_rotation
    from pangu_light.calib.stats import calibrate as calibrate_again
    from pangu_light.passes.surgery.rotation_basis import save_rotation

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 160, (8, 40))
    batches = [(ids[i: i + 4], np.ones_like(ids[i: i + 4])) for i in range(0, 8, 4)]
    rotation = collect_rotation(setting["original"], batches)
    save_rotation(tmp_path / "rotation.npz", rotation)
    stats = calibrate_again(setting["original"], batches)
    select = generate_candidates(setting["model_map"], stats, align=8, **GRID)
    rotate = generate_candidates(setting["model_map"], stats, align=8, **GRID, hidden_method="rotate",
                                 rotation=rotation, rotation_file=str(tmp_path / "rotation.npz"))
    assert {c.key for c in rotate} == {c.key for c in select}
    cut = [c for c in rotate if len(c.plan.hidden) < c.plan.hidden_size]
    assert cut and all(c.plan.hidden_method == "rotate" for c in cut)
    assert all(c.plan.hidden_method == "select" for c in rotate if c not in cut)
    original = ir.load(setting["original"])
    with pytest.raises(PanguLightError, match="needs the rotation"):
        compile_candidate(setting["original"], cut[0].plan, tmp_path / "c.onnx", original=original,
                          grams=setting["grams"])
    path = compile_candidate(setting["original"], cut[0].plan, tmp_path / "c.onnx", original=original,
                             grams=setting["grams"], rotation=rotation)
    assert path.is_file()


def test_a_shape_that_missed_the_target_by_noise_is_measured_again(setting, monkeypatch, tmp_path):
    """Every first measurement misses the target in its median but reaches it in its upper
    quartile (a noisy run); the search measures the lowest-proxy such shapes again with twice the
    rounds, pools the rounds and chooses among them, instead of saying no shape reaches it."""
    calls = []

    def fake(baseline, graphs, requests, *, repeats, **options):
        calls.append(repeats)
        samples = [TARGET * f for f in (0.9, 0.95, 1.05)] if repeats == 3 else [TARGET * 1.1] * repeats
        return [{**driver.Stat.of(samples).to_json(), "load_average": [0, 0]} for _ in graphs]

    monkeypatch.setattr(driver, "measure_speedups", fake)
    result, table = search(setting, tmp_path)
    assert 6 in calls and calls.index(6) == len(calls) - 1  # one re-measurement, the last call
    entry = table.speedup(result.chosen.key)
    assert entry["remeasured"] and entry["median"] >= TARGET and len(entry["samples"]) == 9
    assert result.measured_now == sum(1 for e in table.entries.values())  # pooling adds no new shape
    again = [c for c in setting["candidates"] if table.speedup(c.key) and table.speedup(c.key).get("remeasured")]
    kls = {r["label"]: r["kl"] for r in result.rows if r.get("kl") is not None}
    assert kls[result.chosen.label] == min(kls[c.label] for c in again)


def test_near_target_needs_the_median_to_miss_and_the_upper_quartile_to_reach():
    assert driver.near_target({"median": 1.5, "q3": 1.7}, 1.6)
    assert not driver.near_target({"median": 1.5, "q3": 1.55}, 1.6)
    assert not driver.near_target({"median": 1.65, "q3": 1.7}, 1.6)
    assert not driver.near_target({"median": 1.5, "q3": 1.7, "remeasured": True}, 1.6)
    assert not driver.near_target(None, 1.6)
