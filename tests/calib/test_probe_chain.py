"""The layer probe's chain of one-layer sessions (calib.layer_chain) against the plain computation it
replaces: the whole graph with the probed weight swapped in and the NLL log-softmaxed in float64
numpy, for every layer and both projections, on families of different layouts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pangu_light.calib.evaluate import token_nll
from pangu_light.calib.gram import collect_grams
from pangu_light.calib.half import widen_to_float32
from pangu_light.calib.layer_chain import NLL, TARGETS, add_nll_output
from pangu_light.calib.refit import refit_projection
from pangu_light.calib.sensitivity import head_order
from pangu_light.calib.sensitivity_probe import probe_layers, probe_widths
from pangu_light.calib.stats import calibrate
from pangu_light.calib.taps import saved_for_session
from pangu_light.core import contract
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.runtime.session import create_session

from reference import left_padded_batch

EPS32 = float(np.finfo(np.float32).eps)
# A logit computed by the whole graph and by the chain: the same float32 operations on the same
# values, except that ONNX Runtime may fuse a residual Add with the next norm in one and not the
# other, re-associating a few float32 sums: within a few units of rounding of the largest logit
# (16 u |z|max, generous). A per-token NLL moves by at most twice a uniform logit error, and a
# rise is a difference of two mean NLLs: 4 x 16 u |z|max.
LOGIT_ROUNDINGS = 16


def nll_rounding(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The float32 LogSoftmax's worst-case error per token [B, L - 1] (calib.layer_chain):
    (1.4 V + 4 + 3 (|z_t - m| + log V)) u."""
    z = logits[:, :-1].astype(np.float64)
    spread = z.max(axis=-1) - np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0]
    vocab = z.shape[-1]
    return (1.4 * vocab + 4 + 3 * (spread + np.log(vocab))) * EPS32 / 2


def reference_probe(path, stats, grams, sequences, batch_size):
    """The probe as it was: one session of the whole (float32) graph with every o_proj and
    down_proj weight a graph input, float64 ``token_nll`` on the logits it returns. Returns
    {(proj, layer): per-token NLL}, the base NLL, the largest |logit| and the largest
    ``nll_rounding`` seen."""
    model = ir.load(path)
    widen_to_float32(model)
    model_map = ModelMap.from_model(model)
    weights = {}
    for layer in model_map.layers:
        for linear in (layer.attention.o, layer.ffn.down):
            value = linear.weight
            weights[value.name] = np.asarray(value.const_value.numpy(), np.float32)
            model.graph.initializers.pop(value.name)
            value.const_value = None
            model.graph.inputs.append(value)
    with saved_for_session(model, mapped=False) as saved:
        session = create_session(saved, provider="cpu").session
    largest = [0.0, 0.0]

    def losses(override):
        out = []
        for start in range(0, len(sequences), batch_size):
            ids = sequences[start : start + batch_size].astype(np.int64)
            feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids), **weights, **override}
            (logits,) = session.run([contract.LOGITS], feeds)
            largest[0] = max(largest[0], float(np.abs(logits).max()))
            largest[1] = max(largest[1], float(nll_rounding(logits, ids).max()))
            out.append(token_nll(logits, ids).ravel())
        return np.concatenate(out)

    probes = {}
    for layer in model_map.layers:
        heads_kept, ffn_kept = probe_widths(model_map, layer.index)
        attention = layer.attention
        for proj, linear, order, kept_count in (
            ("o", attention.o, head_order(stats.heads[layer.index], attention.num_kv_heads, attention.head_dim),
             heads_kept * attention.num_kv_heads * attention.head_dim),
            ("down", layer.ffn.down, np.argsort(-stats.ffn[layer.index], kind="stable"), ffn_kept),
        ):
            original = weights[linear.weight.name].astype(np.float64).T
            kept = np.sort(order[:kept_count])
            fit = refit_projection(grams.gram[proj][layer.index], grams.sum[proj][layer.index], grams.tokens,
                                   kept, original)
            fed = np.zeros_like(original)
            fed[kept] = fit.weight
            probes[proj, layer.index] = losses({linear.weight.name: fed.T.astype(np.float32)})
    return probes, losses({}), *largest


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("gemma3", "float32"), ("glm4", "float32"),
                                          ("qwen3", "float16")])
def test_chain_probe_equals_the_whole_graph(exported_graph, family, dtype):
    """Every rise and its standard error equal the whole graph's with the same weight swapped in,
    within float32 rounding of the logits and of the NLL computed from them; gemma3 (sandwich norms,
    sliding windows, a scaled embedding), glm4 (fused gate_up, untied head) and a float16 graph
    (probed as its float32 copy) cut as Llama does."""
    hf_model, path = exported_graph(family, dtype=dtype)
    vocab = hf_model.config.vocab_size
    batches = [(ids.numpy(), mask.numpy()) for ids, mask in
               (left_padded_batch(vocab, lengths=(40, 33, 40, 25), seed=s) for s in range(4))]
    stats, grams = calibrate(path, batches), collect_grams(path, batches)
    sequences = np.random.default_rng(5).integers(3, vocab, size=(5, 24))  # 2 batches, the last one short
    scales = probe_layers(path, stats, grams, sequences, batch_size=3)
    probes, base, largest, nll_bound = reference_probe(path, stats, grams, sequences, batch_size=3)
    bound = 4 * LOGIT_ROUNDINGS * EPS32 * largest + 2 * nll_bound
    assert abs(scales.base_loss - base.mean()) <= bound / 2
    for (proj, index), nll in probes.items():
        difference = nll - base
        assert abs(scales.rises[proj][index] - difference.mean()) <= bound, (proj, index)
        noise = difference.std(ddof=1) / np.sqrt(difference.size)
        assert abs(scales.noise[proj][index] - noise) <= bound, (proj, index)
    assert max(abs(r) for p in ("o", "down") for r in scales.rises[p]) > 10 * bound  # probes that bite


def test_nll_output_equals_token_nll(exported_graph):
    """The graph's own NLL output equals float64 token_nll on the logits it computes, within the
    float32 LogSoftmax's worst-case rounding (``nll_rounding``)."""
    _, path = exported_graph("llama")
    model = ir.load(path)
    logits_value = next(v for v in model.graph.outputs if v.name == contract.LOGITS)
    add_nll_output(model)
    model.graph.outputs.append(logits_value)
    with saved_for_session(model, mapped=False) as saved:
        session = create_session(saved, provider="cpu").session
    ids = np.random.default_rng(0).integers(3, 160, size=(3, 17))
    nll, logits = session.run([NLL, contract.LOGITS], {contract.INPUT_IDS: ids, contract.ATTENTION_MASK:
                                                       np.ones_like(ids), TARGETS: ids[:, 1:, None]})
    assert nll.shape == (3, 16, 1)
    bound = nll_rounding(logits, ids)
    assert (np.abs(nll[..., 0] - token_nll(logits, ids)) <= bound).all()
    assert (np.abs(nll[..., 0] - token_nll(logits[..., ::-1], ids)) > 100 * bound).mean() > 0.9  # targets matter
