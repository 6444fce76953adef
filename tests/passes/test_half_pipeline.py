"""Passes keep a half graph's dtype and compute its weights as they compute a float32 graph's.

Every rewrite that folds or rescales weights computes in float64 and casts back once to the
initializer's dtype. So a pipeline on a float16/bfloat16 graph gives the weights the same
pipeline gives on the float32 copy of that graph (``calib.half.widen_to_float32``: the very
same weight values), cast to the half dtype, within one rounding per element: float64 -> half
directly against float64 -> float32 -> half differ at most by one half-precision spacing (a
double rounding). Pure gathers (slices, dropped heads and layers) agree exactly. The bound can
fail: an edit computed from other values, or in the half dtype, is off by many spacings.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.half import HALF, widen_to_float32
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.plan import ClapMerge, PrunePlan

from reference import torch_slice_hidden
from reference_half import Runner, half_bound, left_padded, torch_logits

PIPELINES = {
    # CLAP (layer 3's KV group 0 merged into layer 1; a plan), rotate (gamma folds, rotation,
    # RMS correction), slice, heads, FFN, SLNP
    "llama": "drop-layers{plan=true},rotate-hidden{random_seed=0},slice-hidden{keep_first=48},"
             "prune-heads{per_group=1},prune-ffn{keep_first=64},slnp",
    # post-norm absorption (scales o/down by s_inv x gamma), slice, SLNP with 1 + w gammas
    "gemma2": "absorb-post-norm{s_inv=[0.5,1.7,2.3,0.8,1.1,0.4,2.9,1.3]},slice-hidden{keep_first=40},"
              "prune-ffn{keep_first=48},slnp",
}


def _load(path) -> ir.Model:
    """The graph, with the CLAP plan attached (llama: layers 2 and 3 dropped, 3's group 0 into 1)."""
    model = ir.load(path)
    if model.metadata_props.get("pangu_light.family") != "llama":
        return model
    plan = PrunePlan.identity(ModelMap.from_model(model))
    plan.drop_layers, plan.clap, plan.clap_merges = [2, 3], True, [ClapMerge(3, 1, [(1, 0), (3, 0)])]
    plan.attach(model)
    return model


def _spacing(dtype: ir.DataType, values: np.ndarray) -> np.ndarray:
    """One half-precision spacing at each value's magnitude."""
    u = 2.0 ** (-10 if dtype == ir.DataType.FLOAT16 else -7)  # eps of the dtype
    tiny = 2.0 ** (-24 if dtype == ir.DataType.FLOAT16 else -133)
    return np.maximum(u * 2.0 ** np.floor(np.log2(np.maximum(np.abs(values), 1e-300))), tiny)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", list(PIPELINES))
def test_half_pipeline_equals_float32_cast(exported_graph, family, dtype):
    _, path = exported_graph(family, kv_cache=False, dtype=dtype)
    half, full = _load(path), _load(path)
    before = {name: value.dtype for name, value in half.graph.initializers.items()}
    assert widen_to_float32(full) in HALF
    run_pipeline(half, PIPELINES[family], verify=True)
    run_pipeline(full, PIPELINES[family], verify=True)
    assert half.graph.outputs[0].dtype in HALF
    assert set(half.graph.initializers) == set(full.graph.initializers)
    changed = exact = 0
    worst = 0.0
    for name, value in half.graph.initializers.items():
        assert value.dtype == before.get(name, value.dtype), f"{name} changed dtype"
        if value.dtype not in HALF:
            continue
        got = value.const_value.numpy().astype(np.float64)
        expected32 = full.graph.initializers[name].const_value.numpy()
        expected = expected32.astype(value.dtype.numpy()).astype(np.float64)
        assert got.shape == expected.shape, name
        off = np.abs(got - expected) / _spacing(value.dtype, expected32.astype(np.float64))
        worst = max(worst, float(off.max(initial=0.0)))
        assert off.max(initial=0.0) <= 1.0, f"{name}: {off.max():.3g} spacings from the float32 result"
        exact += bool(np.array_equal(got, expected))
        changed += 1
    print(f"{family} {dtype}: {changed} half initializers, {exact} exactly equal, worst {worst:.2f} spacings")
    assert changed > 20


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sliced_half_graph_equals_torch_edit(exported_graph, family, dtype, tmp_path):
    """A pruned half graph computes what the same edit on the torch module computes in that
    dtype (hidden channels 0..39 kept), within the half-precision bound of the export test."""
    model, path = exported_graph(family, kv_cache=False, dtype=dtype)
    pruned = ir.load(path)
    run_pipeline(pruned, "slice-hidden{keep_first=40}", verify=True)
    ir.save(pruned, tmp_path / "sliced.onnx")
    reference_model = torch_slice_hidden(model, list(range(40)))
    ids, mask = left_padded(model.config.vocab_size, [9, 6, 4], seed=3)
    logits = Runner(tmp_path / "sliced.onnx", dtype)({"input_ids": ids, "attention_mask": mask})["logits"]
    reference = torch_logits(reference_model, ids, mask)
    keep = mask.astype(bool)
    diff = float(np.abs(logits.astype(np.float32)[keep] - reference[keep]).max())
    unpruned = torch_logits(model, ids, mask)
    print(f"{family} {dtype} sliced |graph - torch| = {diff:.3g}, bound {half_bound(dtype, reference[keep]):.3g}, "
          f"slicing moved the logits by {np.abs(unpruned - reference)[keep].max():.3g}")
    assert diff <= half_bound(dtype, reference[keep])
    assert np.abs(unpruned - reference)[keep].max() > 4 * half_bound(dtype, reference[keep])  # the test can fail
