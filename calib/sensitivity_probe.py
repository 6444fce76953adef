"""The layer probe of the sensitivity spread: how much the calibration loss rises when ONE layer
alone loses some query heads, or some FFN neurons, with its projection refit.

The refit's output error R (``calib.sensitivity.prefix_residuals``) gives the shape of each
layer's cost curve, but not what an error in that layer does to the loss: measured on
SmolLM2-135M, spreading by R alone (or R weighted by Block Influence) cuts the first and last
layers and multiplies LAMBADA perplexity by 6-13 where the uniform spread gives 2.4. The probe
measures the loss itself, once per layer and axis, and converts::

    scale_l,a = max(rise, se) / R_l,a(probe width)       rise = mean_t (nll_probed - nll_unpruned)

with se the standard error of that mean over the probe tokens: a rise within the noise of a few
hundred tokens (or a fall) is taken as se, never as "free" (a zero scale would let the spread cut
that layer to its floors on the strength of noise).

so that cost_l(h, f) = scale_l,o R_o,l(h) + scale_l,down R_down,l(f) is the loss rise predicted
for any width (first order: layers' rises add). The probe widths: one query head fewer per KV
group (heads), half the FFN neurons (FFN), kept in the planner's order.

Removing inputs of a projection y = x W equals zeroing their rows of W, so every probe runs on
one ONNX Runtime session of the unchanged graph whose o_proj and down_proj weights are graph
inputs: a probe feeds the original weights everywhere except its layer's projection, where the
kept rows hold the refit (``calib.refit.refit_projection``) and the removed rows zeros::

    x [.., in] --MatMul(W_fed^T)--> y        W_fed = [W'_K ; 0]  (rows in original order)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from pangu_light.calib.evaluate import token_nll
from pangu_light.calib.gram import GramStats
from pangu_light.calib.half import say_float32_copy, widen_to_float32
from pangu_light.calib.refit import refit_projection
from pangu_light.calib.stats import CalibrationStats
from pangu_light.calib.taps import saved_for_session
from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model

__all__ = ["PROBE_SAMPLES", "PROBE_SEQ_LEN", "LayerScales", "probe_layers", "probe_widths"]

PROBE_SAMPLES, PROBE_SEQ_LEN = 2, 128  # prune's defaults: the first 128 tokens of the first 2 calibration windows


@dataclasses.dataclass
class LayerScales:
    """The probes' mean loss rises and their standard errors, per projection ("o", "down") and layer
    (original numbering); ``calib.sensitivity`` divides ``loss_rise`` by the refit error R at the
    probe width (``probe_widths``) to get each layer's scale."""

    base_loss: float
    rises: dict[str, list[float]]
    noise: dict[str, list[float]]

    def loss_rise(self, proj: str, index: int) -> float:
        """The rise the spread counts: a rise within its standard error (or a fall) counts as that error."""
        return max(self.rises[proj][index], self.noise[proj][index])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def probe_widths(model_map: ModelMap, index: int) -> tuple[int, int]:
    """(query heads kept per group, FFN neurons kept) of layer ``index``'s probes."""
    attention = model_map.layer(index).attention
    return (attention.num_heads // attention.num_kv_heads - 1, model_map.layer(index).ffn.intermediate_size // 2)


def probe_layers(
    graph_path: str | os.PathLike,
    stats: CalibrationStats,
    grams: GramStats,
    sequences: np.ndarray,
    *,
    batch_size: int = 4,
    threads: int | None = None,
    on_probe: Callable[[], None] | None = None,
) -> LayerScales:
    """Probe every layer of the no-cache graph at ``graph_path`` on token ``sequences`` [N, L]."""
    from pangu_light.calib.sensitivity import head_order
    from pangu_light.runtime.session import create_session

    model = load_model(graph_path)
    half = widen_to_float32(model)  # a half graph probes as its float32 copy, as calibration does
    if half is not None:
        say_float32_copy(half, "the layer probe")
    model_map = ModelMap.from_model(model)
    if model_map.graph_kind != "no-cache":
        raise PanguLightError("the layer probe runs on the no-cache graph (original.onnx), not a decode graph")
    weights: dict[str, np.ndarray] = {}
    for layer in model_map.layers:
        for linear in (layer.attention.o, layer.ffn.down):
            value = linear.weight
            if value.name in weights:
                continue
            weights[value.name] = np.asarray(value.const_value.numpy(), dtype=np.float32)
            model.graph.initializers.pop(value.name)
            value.const_value = None
            model.graph.inputs.append(value)
    with saved_for_session(model, mapped=half is None) as path:
        del model
        session = create_session(path, provider="cpu", threads=threads).session

    def losses(override: dict[str, np.ndarray]) -> np.ndarray:
        per_token = []
        for start in range(0, len(sequences), batch_size):
            ids = sequences[start : start + batch_size].astype(np.int64)
            feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids), **weights, **override}
            (logits,) = session.run([contract.LOGITS], feeds)
            per_token.append(token_nll(logits, ids).ravel())
        if on_probe is not None:
            on_probe()
        return np.concatenate(per_token)

    base = losses({})
    rises: dict[str, list[float]] = {"o": [], "down": []}
    noises: dict[str, list[float]] = {"o": [], "down": []}
    for layer in model_map.layers:
        heads_kept, ffn_kept = probe_widths(model_map, layer.index)
        attention = layer.attention
        orders = {
            "o": (attention.o, head_order(stats.heads[layer.index], attention.num_kv_heads, attention.head_dim),
                  heads_kept * attention.num_kv_heads * attention.head_dim),
            "down": (layer.ffn.down, np.argsort(-stats.ffn[layer.index], kind="stable"), ffn_kept),
        }
        for proj, (linear, order, kept_count) in orders.items():
            if kept_count < 1:  # one head per group: nothing to probe, nothing to remove
                rises[proj].append(0.0)
                noises[proj].append(0.0)
                continue
            original = weights[linear.weight.name].astype(np.float64).T  # [in, out]
            kept = np.sort(order[:kept_count])
            gram, total = grams.gram[proj][layer.index], grams.sum[proj][layer.index]
            fit = refit_projection(gram, total, grams.tokens, kept, original)
            fed = np.zeros_like(original)
            fed[kept] = fit.weight
            difference = losses({linear.weight.name: fed.T.astype(np.float32)}) - base
            rise = float(difference.mean())
            noise = float(difference.std(ddof=1) / np.sqrt(difference.size)) if difference.size > 1 else 0.0
            rises[proj].append(rise)
            noises[proj].append(noise)
    return LayerScales(base_loss=float(base.mean()), rises=rises, noise=noises)
