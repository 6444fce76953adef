"""`calibrate --max-memory`: the batch size from the memory estimate, the same statistics, and
one clear line when the budget cannot hold the weights."""

from __future__ import annotations

import numpy as np
import pytest

from pangu_light.calib.calibrate import calibrate_graph
from pangu_light.calib.memory import MemoryEstimate, estimate_calibration_memory, parse_size
from pangu_light.calib.stats import CalibrationStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model
from pangu_light.tools.cli import main

from families import tiny_model
from reference import save_char_tokenizer

TEXT = {"data": "wiki", "samples": 6, "seq_len": 24, "seed": 0, "quiet": True}


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-chars")
    tiny_model("llama").save_pretrained(path)
    save_char_tokenizer(path)
    graph = path / "model.onnx"
    assert main(["export", str(path), "-o", str(graph), "--quiet"]) == 0
    return graph


def _estimate(graph) -> MemoryEstimate:
    model = load_model(graph)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    return estimate_calibration_memory(ModelMap.from_model(model), weights, TEXT["seq_len"])


def test_parse_size():
    assert parse_size("4G") == 4 * 2**30 and parse_size("512M") == 512 * 2**20
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("2gb") == 2 * 2**30 and parse_size("1000") == 1000
    with pytest.raises(PanguLightError, match="cannot read the size"):
        parse_size("four gigs")


def test_estimate_follows_the_formula(tiny_graph):
    estimate = _estimate(tiny_graph)
    layers = ModelMap.from_model(load_model(tiny_graph)).layers
    attention, ffn, length = layers[0].attention, layers[0].ffn.intermediate_size, TEXT["seq_len"]
    width = max(attention.q.in_features, attention.num_heads * attention.head_dim)  # every layer alike
    one_layer = 3 * attention.num_heads * length + 6 * ffn + 12 * width
    expected = 4 * length * (2 * len(layers) * (5 * width + ffn) + one_layer)
    assert estimate.per_sequence == expected
    assert estimate.peak(3) == estimate.weights + estimate.overhead + 3 * expected


def test_small_budget_gives_a_smaller_batch_and_the_same_statistics(tiny_graph, capsys):
    estimate = _estimate(tiny_graph)
    budget = estimate.peak(2) + estimate.per_sequence // 2  # room for two sequences, not three
    assert estimate.batch_size(budget, samples=6) == 2
    assert estimate.batch_size(estimate.peak(100), samples=6) == 6  # never more than the samples
    whole = calibrate_graph(tiny_graph, batch_size=6, **TEXT)
    capsys.readouterr()
    bounded = calibrate_graph(tiny_graph, batch_size=6, max_memory=budget, **TEXT)
    assert "-> batch size 2 " in capsys.readouterr().err
    assert bounded.meta["batch_size"] == 2 and bounded.tokens == whole.tokens
    # Batches are added in float64 (3 batches against 1: a few float64 roundings); the per-sample
    # sums over L tokens come out of ONNX Runtime's float32 kernels, which may round differently
    # for another batch shape (identical here; 7e-8 relative on SmolLM2-135M): at most L float32
    # roundings. A lost or repeated batch would be off by a third.
    for got, expected in zip(_arrays(bounded), _arrays(whole), strict=True):
        np.testing.assert_allclose(got, expected, rtol=TEXT["seq_len"] * np.finfo(np.float32).eps, atol=0)


def _arrays(stats: CalibrationStats) -> list[np.ndarray]:
    return [stats.channel, *stats.heads, *stats.ffn, stats.block_influence,
            np.array(list(stats.s_inv.values()), dtype=np.float64)]


def test_budget_below_the_weights_is_one_clear_line(tiny_graph, tmp_path, capsys):
    estimate = _estimate(tiny_graph)
    with pytest.raises(PanguLightError, match="below the graph's weights") as error:
        estimate.batch_size(estimate.weights // 2, samples=6)
    assert "\n" not in str(error.value)
    with pytest.raises(PanguLightError, match="less than one sequence"):
        estimate.batch_size(estimate.peak(1) - 1, samples=6)
    assert main(["calibrate", str(tiny_graph), "--data", "wiki", "--samples", "6", "--seq-len", "24",
                 "--max-memory", "1K", "-o", str(tmp_path / "stats.npz"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "below the graph's weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "stats.npz").exists()
