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

Removing inputs of a projection y = x W equals zeroing their rows of W, so every probe runs the
unchanged graph with its o_proj and down_proj weights as graph inputs: a probe feeds the original
weights everywhere except its layer's projection, where the kept rows hold the refit
(``calib.refit.refit_projection``) and the removed rows zeros::

    x [.., in] --MatMul(W_fed^T)--> y        W_fed = [W'_K ; 0]  (rows in original order)

The graph runs as a chain of one-layer sessions (``calib.layer_chain``): one run with the original
weights stores the residual stream entering every layer and the base NLL, and the probes of layer
l run layers l..n-1 from that stream (the layers before it are unchanged), with the per-token NLL
computed inside the graph. The stored stream is [N, L, hidden] float32 per layer: 71 MB for
prune's 4 x 256 probe tokens on SmolLM2-135M (30 layers, hidden 576).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from pangu_light.calib.gram import GramStats
from pangu_light.calib.layer_chain import LayerChain
from pangu_light.calib.refit import refit_projection
from pangu_light.calib.stats import CalibrationStats
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["PROBE_SAMPLES", "PROBE_SEQ_LEN", "LayerScales", "probe_layers", "probe_widths"]

PROBE_SAMPLES, PROBE_SEQ_LEN = 4, 256  # prune's defaults: the first 4 calibration windows, whole


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
    with LayerChain(graph_path, threads=threads) as chain:
        model_map, weights = chain.model_map, chain.weights
        batches = [sequences[start : start + batch_size].astype(np.int64)
                   for start in range(0, len(sequences), batch_size)]
        runs = [chain.residuals(ids) for ids in batches]  # (stream entering every layer, base NLL) per batch
        chain.free_embed()
        if on_probe is not None:
            on_probe()

        def losses(index: int, override: dict[str, np.ndarray]) -> np.ndarray:
            per_token = [chain.nll(ids, stream[index], index, override).ravel()
                         for ids, (stream, _) in zip(batches, runs)]
            if on_probe is not None:
                on_probe()
            return np.concatenate(per_token)

        base = np.concatenate([nll.ravel() for _, nll in runs])
        return _probe_every_layer(model_map, stats, grams, weights, losses, base)


def _probe_every_layer(model_map: ModelMap, stats: CalibrationStats, grams: GramStats,
                       weights: dict[str, np.ndarray], losses: Callable[[int, dict[str, np.ndarray]], np.ndarray],
                       base: np.ndarray) -> LayerScales:
    """Each layer's two probes: ``losses(layer, {weight name: fed weight})`` is the per-token NLL
    with that weight fed, ``base`` the unchanged model's."""
    from pangu_light.calib.sensitivity import head_order

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
            difference = losses(layer.index, {linear.weight.name: fed.T.astype(np.float32)}) - base
            rise = float(difference.mean())
            noise = float(difference.std(ddof=1) / np.sqrt(difference.size)) if difference.size > 1 else 0.0
            rises[proj].append(rise)
            noises[proj].append(noise)
    return LayerScales(base_loss=float(base.mean()), rises=rises, noise=noises)
