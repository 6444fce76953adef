"""float16 and bfloat16 graphs compute what the torch model computes in the same dtype.

Each tiny model of every family is built in the dtype as ``from_pretrained(dtype=...)`` builds
it and exported (``exported_graph(family, kv_cache, dtype)``); the graph runs under ONNX
Runtime (float16; CPU kernels, optimisations off) or under onnx's reference evaluator
(bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels for Where, MatMul and most
others), against the torch module in that dtype on a left-padded batch; the decode graph by
prefill plus greedy steps feeding ``present`` back.

The bound, ``half_bound``: both sides round every op's result to the dtype, so they differ
wherever they accumulate in another order or keep an intermediate in float32 that the other
rounds (ORT runs float16 ops without CPU kernels in float32; the reference evaluator's
bfloat16 MatMul). One such difference is a unit roundoff u = eps / 2 of the value (bfloat16
2^-9, float16 2^-12); a final logit rounded the other way alone is 2 u x |logit|, and earlier
differences reach the logits scaled by the values' size. Measured on these models (the printed
ratios), the largest |graph - torch| is 1.0 to 5.0 u x max |logit| over every family, both
dtypes and both graph kinds; the bound is 16 u x max |logit| (3.2x the worst seen), which for
bfloat16 is 3% of the logits' scale: a graph that computes something else (another head, a
missing norm, a wrong rotary position) moves the logits by a sizeable fraction of their scale.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.passes.analysis.model_map import ModelMap

from reference_half import BOUND_UNITS, IR_DTYPE, Runner, half_bound, left_padded, torch_logits, unit_roundoff

DTYPES = ("float16", "bfloat16")
_IR_DTYPE = IR_DTYPE
DECODE_STEPS = 3


def _real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    return float(np.abs(a.astype(np.float32)[keep] - b[keep]).max())


def _assert_within_half_bound(what: str, logits, reference, mask, dtype) -> None:
    diff, bound = _real(logits, reference, mask), half_bound(dtype, reference[mask.astype(bool)])
    scale = float(np.abs(reference[mask.astype(bool)]).max())
    print(f"{what} |graph - torch| = {diff:.3g} = {diff / (unit_roundoff(dtype) * scale):.1f} u "
          f"x max|logit| {scale:.3g}; bound {bound:.3g}")
    assert diff <= bound


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_no_cache_matches_torch(exported_graph, family, dtype):
    model, path = exported_graph(family, kv_cache=False, dtype=dtype)
    ids, mask = left_padded(model.config.vocab_size, [10, 7, 4], seed=1)
    logits = Runner(path, dtype)({"input_ids": ids, "attention_mask": mask})["logits"]
    assert logits.dtype == np.dtype(_IR_DTYPE[dtype].numpy())
    _assert_within_half_bound(f"{family} {dtype} no-cache", logits, torch_logits(model, ids, mask), mask, dtype)
    assert BOUND_UNITS * unit_roundoff(dtype) < 0.1  # a tenth of the logits' scale: a wrong graph moves them more


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_decode_matches_torch(exported_graph, family, dtype):
    model, path = exported_graph(family, kv_cache=True, dtype=dtype)
    config = model.config
    np_dtype = _IR_DTYPE[dtype].numpy()
    ids, mask = left_padded(config.vocab_size, [6, 3, 5], seed=2)
    run = Runner(path, dtype)
    past = {f"past_key_values.{i}.{kind}": np.zeros((3, config.num_key_value_heads, 0, config.head_dim), np_dtype)
            for i in range(config.num_hidden_layers) for kind in ("key", "value")}
    step_ids, parts = ids, []
    for step in range(DECODE_STEPS + 1):
        out = run({"input_ids": step_ids, "attention_mask": mask, **past})
        parts.append(out["logits"])
        past = {name: out[name.replace("past_key_values.", "present.")] for name in past}
        assert all(v.dtype == np.dtype(np_dtype) for v in past.values())
        if step == DECODE_STEPS:
            break
        step_ids = out["logits"][:, -1].astype(np.float32).argmax(-1).astype(np.int64)[:, None]
        ids = np.concatenate([ids, step_ids], 1)
        mask = np.concatenate([mask, np.ones_like(step_ids)], 1)
    logits = np.concatenate(parts, 1)
    _assert_within_half_bound(f"{family} {dtype} decode", logits, torch_logits(model, ids, mask), mask, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_graph_structure(exported_graph, family, dtype):
    """Weights, logits and cache in the dtype, each weight the torch module's own (same
    rounding); the model map reads the half graph as it reads the float32 one."""
    model, path = exported_graph(family, kv_cache=True, dtype=dtype)
    _, path32 = exported_graph(family, kv_cache=True)
    graph = ir.load(path).graph
    half = _IR_DTYPE[dtype]
    assert all(v.dtype == half for v in graph.outputs)
    assert all(v.dtype == half for v in graph.inputs[2:])
    state = {name: t for name, t in model.state_dict().items()}
    checked = 0
    for name, value in graph.initializers.items():
        if name in state:
            assert value.dtype == half, name
            np.testing.assert_array_equal(value.const_value.numpy().astype(np.float32),
                                          state[name].float().numpy(), err_msg=name)
            checked += 1
    assert checked >= 9 * config_layers(model)
    assert ModelMap.from_model(ir.load(path)).summary() == ModelMap.from_model(ir.load(path32)).summary()


def config_layers(model) -> int:
    return model.config.num_hidden_layers
