"""Calibration statistics (paper section 3): what the planner ranks, computed through the graph.

For calibration tokens X (padding excluded) and per-sample sums from ``calib.taps``:

    S_channel[k] = sum_l sum_{x in X} |RMSNorm_l(x)[k]|          every hidden-size norm   (eq. 1)
    S_head_l[j]  = sum_{x in X} || attn_l(x)[head j] ||_2        before o_proj            (eq. 2)
    S_ffn_l[m]   = sum_{x in X} | act(x W_gate) * (x W_up) |[m]  input of down_proj       (eq. 3)
    BI_l         = 1 - mean_{x in X} cos(h_{l-1}(x), h_l(x))     layer input vs output    (eq. 4)
    s_inv_n      = mean_{x in X} 1 / sqrt(mean_k x_k^2 + eps)    input of each post-norm  (eq. 8)
    spread_n     = std_{x in X} log(1 / sqrt(mean_k x_k^2 + eps))  how far one constant is off

``aggregation="paper"`` sums over every token as written above. ``"minitron"`` (Minitron,
Muralidharan et al. 2024) takes, for each sample, the mean over its tokens and then the L2
norm over samples; for S_channel that is done per norm and the norms are then summed.
Block Influence and s_inv are means over all tokens in both cases.

Per norm, the statistics of its effective gamma (1 + w for Gemma) are stored too (paper
Figure 3: how spread the post-norm scales are): mean, std, min, max, mean |gamma|, L2.

Saved as .npz: ``channel`` [H], ``head.<l>``, ``ffn.<l>``, ``block_influence`` [L],
``s_inv.<gamma name>`` and ``s_inv_spread.<gamma name>`` (scalars), ``gamma.<gamma name>`` [6],
``tokens``, and ``meta`` (JSON). Files from before ``s_inv_spread`` existed load with it empty.

spread_n is what decides whether absorbing a post-norm is safe: absorption replaces the
per-token 1/rms by its mean, so a token whose 1/rms is e^(2 spread) times the mean gets its
branch output scaled by that factor. On Gemma-3-270M the spreads range 0.08-0.37; absorbing
every post-norm breaks the model, absorbing only the steadiest keeps it (calib/planner.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from pangu_light.calib.taps import TapLayout, add_statistic_taps, run_tapped
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write
from pangu_light.core.paths import record_path, resolve_recorded_path
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["AGGREGATIONS", "CalibrationStats", "GAMMA_FIELDS", "StatsAccumulator", "calibrate", "gamma_statistics"]

AGGREGATIONS = ("paper", "minitron")
GAMMA_FIELDS = ("mean", "std", "min", "max", "mean_abs", "l2")
STATS_FORMAT = "pangu-light-stats/1"


@dataclasses.dataclass
class CalibrationStats:
    channel: np.ndarray
    heads: list[np.ndarray]
    ffn: list[np.ndarray]
    block_influence: np.ndarray
    s_inv: dict[str, float]
    gamma: dict[str, np.ndarray]
    tokens: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    s_inv_spread: dict[str, float] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (``core.files.atomic_write``). The graph the
        statistics describe is recorded relative to the stats file (absolute as fallback)."""
        meta = dict(self.meta)
        if meta.get("graph"):
            meta["graph"] = record_path(meta["graph"], path)
        arrays: dict[str, np.ndarray] = {
            "channel": self.channel,
            "block_influence": self.block_influence,
            "tokens": np.array(self.tokens),
            "meta": np.array(json.dumps({"format": STATS_FORMAT, **meta})),
        }
        arrays.update({f"head.{i}": h for i, h in enumerate(self.heads)})
        arrays.update({f"ffn.{i}": f for i, f in enumerate(self.ffn)})
        arrays.update({f"s_inv.{name}": np.array(v) for name, v in self.s_inv.items()})
        arrays.update({f"s_inv_spread.{name}": np.array(v) for name, v in self.s_inv_spread.items()})
        arrays.update({f"gamma.{name}": g for name, g in self.gamma.items()})
        with atomic_write(path, suffix=".npz") as temporary:
            np.savez(temporary, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
            meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError) as error:
            raise PanguLightError(
                f"{path} is not a statistics file written by `pangu-light calibrate` ({error})"
            ) from None
        if meta.pop("format", None) != STATS_FORMAT:
            raise PanguLightError(f"{path} has an unknown statistics format; re-run `pangu-light calibrate`")
        if meta.get("graph"):
            meta["graph"] = str(resolve_recorded_path(meta["graph"], path))
        layers = sum(1 for key in data.files if key.startswith("head."))
        return cls(
            channel=data["channel"],
            heads=[data[f"head.{i}"] for i in range(layers)],
            ffn=[data[f"ffn.{i}"] for i in range(layers)],
            block_influence=data["block_influence"],
            s_inv={k[len("s_inv."):]: float(data[k]) for k in data.files if k.startswith("s_inv.")},
            gamma={k[len("gamma."):]: data[k] for k in data.files if k.startswith("gamma.")},
            tokens=int(data["tokens"]),
            meta=meta,
            s_inv_spread={
                k[len("s_inv_spread."):]: float(data[k]) for k in data.files if k.startswith("s_inv_spread.")
            },
        )


def gamma_statistics(model_map: ModelMap) -> dict[str, np.ndarray]:
    """Per norm (hidden, q/k), GAMMA_FIELDS of the effective gamma."""
    result = {}
    for norm in model_map.all_norms():
        g = norm.effective_gamma().astype(np.float64)
        result[norm.gamma.name] = np.array(
            [g.mean(), g.std(), g.min(), g.max(), np.abs(g).mean(), np.sqrt((g * g).sum())]
        )
    return result


class StatsAccumulator:
    """Folds per-batch tap outputs into float64 totals, both aggregations at once."""

    def __init__(self, layout: TapLayout):
        self.layout = layout
        self.tokens = 0
        self.sums: dict[str, np.ndarray] = {}  # paper: sum over every token
        self.squares: dict[str, np.ndarray] = {}  # minitron: sum over samples of (per-sample mean)^2

    def add(self, outputs: dict[str, np.ndarray], mask: np.ndarray) -> None:
        counts = mask.sum(axis=1).astype(np.float64)  # tokens per sample
        if (counts == 0).any():
            raise PanguLightError("a calibration sample has no tokens (all padding)")
        self.tokens += int(counts.sum())
        for name, value in outputs.items():
            value = value.astype(np.float64)
            per_sample_mean = value / counts.reshape((-1,) + (1,) * (value.ndim - 1))
            self.sums[name] = self.sums.get(name, 0.0) + value.sum(axis=0)
            self.squares[name] = self.squares.get(name, 0.0) + (per_sample_mean**2).sum(axis=0)

    def _aggregate(self, name: str, aggregation: str) -> np.ndarray:
        return self.sums[name] if aggregation == "paper" else np.sqrt(self.squares[name])

    def result(self, model_map: ModelMap, aggregation: str = "paper", meta: dict | None = None) -> CalibrationStats:
        if aggregation not in AGGREGATIONS:
            raise PanguLightError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
        if not self.tokens:
            raise PanguLightError("no calibration tokens were seen")
        layout = self.layout
        channel = sum(self._aggregate(name, aggregation) for name in layout.channel.values())
        mean_cos = np.array([self.sums[name] / self.tokens for name in layout.cosine])
        return CalibrationStats(
            channel=np.asarray(channel),
            heads=[self._aggregate(name, aggregation) for name in layout.heads],
            ffn=[self._aggregate(name, aggregation) for name in layout.ffn],
            block_influence=1.0 - mean_cos,
            s_inv={gamma: float(self.sums[name] / self.tokens) for gamma, name in layout.s_inv.items()},
            gamma=gamma_statistics(model_map),
            tokens=self.tokens,
            meta={"aggregation": aggregation, **(meta or {})},
            s_inv_spread={gamma: self._spread(*names) for gamma, names in layout.s_inv_log.items()},
        )

    def _spread(self, log_sum: str, log_square_sum: str) -> float:
        mean = float(self.sums[log_sum]) / self.tokens
        variance = float(self.sums[log_square_sum]) / self.tokens - mean * mean
        return float(np.sqrt(max(variance, 0.0)))


def calibrate(
    graph_path: str | os.PathLike,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    aggregation: str = "paper",
    provider: str = "cpu",
    threads: int | None = None,
    meta: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> CalibrationStats:
    """Run the tapped graph over ``batches`` of (input_ids [B, S], attention_mask [B, S]).

    The graph at ``graph_path`` is not modified: a tapped copy runs (``taps.run_tapped``)."""
    if aggregation not in AGGREGATIONS:
        raise PanguLightError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    model = ir.load(graph_path)
    model_map = ModelMap.from_model(model)
    layout = add_statistic_taps(model, model_map)
    accumulator = StatsAccumulator(layout)
    providers = run_tapped(
        model, batches, layout.outputs(), accumulator.add, mask_name=layout.mask_name, provider=provider,
        threads=threads, on_batch=on_batch,
    )
    stats_meta = {"graph": str(Path(graph_path).resolve()), "providers": providers, **(meta or {})}
    return accumulator.result(model_map, aggregation, stats_meta)


def batched(sequences: np.ndarray, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, all-ones mask) batches over fixed-length token sequences [N, L]."""
    if batch_size < 1:
        raise PanguLightError(f"batch size must be at least 1 (got {batch_size})")
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        yield chunk, np.ones_like(chunk)
