"""One tapped run (calib.one_pass) against the three single-purpose collectors, and the tapped
graph of an external-data graph referencing its weights instead of copying them."""

from __future__ import annotations

import numpy as np
import pytest

from pangu_light.calib import taps
from pangu_light.calib.gram import collect_grams
from pangu_light.calib.one_pass import collect_all
from pangu_light.calib.rotation import collect_rotation
from pangu_light.calib.stats import calibrate
from pangu_light.passes.infra.graph_io import load_model, save_model_atomic

from reference import left_padded_batch


def _batches(vocab: int):
    first = left_padded_batch(vocab, seed=0)
    second = left_padded_batch(vocab, lengths=(7, 9, 2), seed=1)
    return [(ids.numpy(), mask.numpy()) for ids, mask in (first, second)]  # two: float64 accumulation


def _assert_stats_equal(got, expected):
    np.testing.assert_array_equal(got.channel, expected.channel)
    for a, b in zip(got.heads + got.ffn, expected.heads + expected.ffn, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.block_influence, expected.block_influence)
    assert got.s_inv == expected.s_inv and got.s_inv_spread == expected.s_inv_spread
    assert got.tokens == expected.tokens and got.meta == expected.meta


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_one_pass_equals_the_three_collectors(exported_graph, family):
    hf_model, path = exported_graph(family)
    batches = _batches(hf_model.config.vocab_size)
    meta = {"data": "test"}
    together = collect_all(path, batches, grams=True, rotation=True, meta=meta)
    _assert_stats_equal(together.stats, calibrate(path, batches, meta=meta))
    grams = collect_grams(path, batches, meta=meta)
    assert together.grams.tokens == grams.tokens and together.grams.meta == grams.meta
    for proj in ("o", "down"):
        for a, b in zip(together.grams.gram[proj] + together.grams.sum[proj], grams.gram[proj] + grams.sum[proj],
                        strict=True):
            np.testing.assert_array_equal(a, b)
    rotation = collect_rotation(path, batches, meta=meta)
    np.testing.assert_array_equal(together.rotation.basis, rotation.basis)
    assert together.rotation.energy.keys() == rotation.energy.keys()
    for name, energy in rotation.energy.items():
        np.testing.assert_array_equal(together.rotation.energy[name], energy)


def test_one_pass_without_grams_or_rotation(exported_graph):
    hf_model, path = exported_graph("qwen2")
    batches = _batches(hf_model.config.vocab_size)
    alone = collect_all(path, batches, grams=False, rotation=False)
    assert alone.grams is None and alone.rotation is None
    _assert_stats_equal(alone.stats, calibrate(path, batches))


def test_tapped_graph_references_the_external_weights(exported_graph, tmp_path, monkeypatch):
    """A graph with a weights file: the tapped copy is written beside it (no temporary copy of the
    weights, no file left afterwards) and gives the statistics of the embedded graph exactly."""
    hf_model, path = exported_graph("llama")
    external = save_model_atomic(load_model(path), tmp_path / "external.onnx", external=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    batches = _batches(hf_model.config.vocab_size)
    expected = calibrate(path, batches)

    def no_temporary_copy(*args, **kwargs):
        raise AssertionError("the weights were copied to a temporary directory")

    monkeypatch.setattr(taps.tempfile, "TemporaryDirectory", no_temporary_copy)
    got = calibrate(external, batches)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    expected.meta.pop("graph"), got.meta.pop("graph")
    _assert_stats_equal(got, expected)
