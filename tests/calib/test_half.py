"""Calibration and evaluation of half graphs run their float32 copy (calib.half).

The reference is independent of the copy: the float32 export of the same model with its
weights rounded to bfloat16 (``model.to(bfloat16).float()``). Both run float32 arithmetic on
the same values (their logits are bit-identical without ORT's optimisations), so the
statistics differ only where ONNX Runtime's optimiser fuses the two graphs' ops differently
(a Cast left in the copy can stop a fusion) and float32 kernels round differently (measured:
llama 1e-5, qwen3 1.5e-4 of a statistic's scale, on a down_proj Gram): the bound is 1e-3
relative. Unrounded weights move them by more: the last check shows the bound catches it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pangu_light.calib.evaluate import perplexity
from pangu_light.calib.half import file_half_dtype, widen_to_float32
from pangu_light.calib.one_pass import collect_all
from pangu_light.frontend.export import ExportOptions, export_model

from reference import left_padded_batch

REL = 1e-3


def _close(got, expected, what: str) -> None:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = float(np.abs(expected).max())
    diff = float(np.abs(got - expected).max())
    assert diff <= REL * scale, f"{what}: {diff:.3g} > {REL} x {scale:.3g}"


@pytest.fixture(scope="module")
def rounded_float32(tmp_path_factory):
    """family -> the float32 export of the tiny model with bfloat16-rounded weights."""
    made = {}

    def get(model):
        family = model.config.model_type
        if family not in made:
            path = tmp_path_factory.mktemp("rounded") / f"{family}.onnx"
            ir.save(export_model(model.float(), ExportOptions(kv_cache=False)), path)
            made[family] = path
        return made[family]

    return get


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_statistics_equal_the_rounded_float32_export(exported_graph, rounded_float32, family, capfd):
    model, path = exported_graph(family, kv_cache=False, dtype="bfloat16")
    reference_path = rounded_float32(_copy(model))
    vocab = model.config.vocab_size
    batches = [tuple(t.numpy() for t in left_padded_batch(vocab, seed=s)) for s in (0, 1)]
    half = collect_all(path, batches, grams=True, rotation=False)
    assert "runs a float32 copy of this bfloat16 graph" in capfd.readouterr().err
    full = collect_all(reference_path, batches, grams=True, rotation=False)
    assert half.stats.tokens == full.stats.tokens
    _close(half.stats.channel, full.stats.channel, "channel")
    for i, (a, b) in enumerate(zip(half.stats.heads + half.stats.ffn, full.stats.heads + full.stats.ffn, strict=True)):
        _close(a, b, f"heads/ffn {i}")
    _close(half.stats.block_influence, full.stats.block_influence, "block influence")
    for proj in ("o", "down"):
        for a, b in zip(half.grams.gram[proj], full.grams.gram[proj], strict=True):
            _close(a, b, f"gram {proj}")
    # The check can fail: the unrounded float32 graph's statistics differ by far more.
    _, unrounded = exported_graph(family)
    other = collect_all(unrounded, batches, grams=False, rotation=False)
    with pytest.raises(AssertionError):
        _close(other.stats.channel, full.stats.channel, "channel")


def test_bf16_perplexity_runs_the_float32_copy(exported_graph, rounded_float32, capfd):
    model, path = exported_graph("llama", kv_cache=False, dtype="bfloat16")
    sequences = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(3, 12))
    got = perplexity(path, sequences, batch_size=2)
    assert "evaluation runs a float32 copy of this bfloat16 graph" in capfd.readouterr().err
    expected = perplexity(rounded_float32(_copy(model)), sequences, batch_size=2)
    assert abs(got.nll - expected.nll) <= REL * expected.nll


def test_widen_leaves_a_float32_graph_alone(exported_graph):
    _, path = exported_graph("qwen2")
    model = ir.load(path)
    assert widen_to_float32(model) is None and file_half_dtype(path) is None
    _, half_path = exported_graph("qwen2", dtype="float16")
    assert file_half_dtype(half_path) == ir.DataType.FLOAT16
    half = ir.load(half_path)
    assert widen_to_float32(half) == ir.DataType.FLOAT16
    dtypes = {v.dtype for v in half.graph.initializers.values()} | {v.dtype for v in half.graph.outputs}
    assert not dtypes & {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)
