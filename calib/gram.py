"""Projection-input Gram matrices: the second moments an output refit needs, computed through the graph.

For every layer l and each of its two output projections (o_proj, reading the attention
context ``x`` of width n_heads*d; down_proj, reading ``act(gate)*up`` of width F), over the
real (unpadded) calibration tokens t::

    G_l = sum_t x_t^T x_t     [W, W]        s_l = sum_t x_t     [W]        N = number of tokens

Like ``calib.taps``, the reductions are added to a copy of the graph so that ORT returns only
their results, never the [batch, seq, width] activations. Padding is zeroed before the
products (``Where(mask, x, 0)``: a padded position may hold anything, even NaN)::

    x [B,S,W] --Where(mask)--> x0 --Reshape[B*S, W]--> X --MatMul(X^T, X)--> gram.<proj>.<l>  [W, W]
                                  `--ReduceSum(0, 1)-------------------------> sum.<proj>.<l>   [W]

Inside one batch the sums are float32 (the MatMul's own accumulation); ``GramStats`` adds
batches in float64. Saved as .npz through ``core.files.atomic_write``: ``gram.o.<l>``,
``sum.o.<l>``, ``gram.down.<l>``, ``sum.down.<l>``, ``tokens`` and ``meta`` (JSON).

``add_masked_grams`` builds the same reduction for any values: deploy's GPTQ
(``deploy.gptq.collect_input_grams``) taps the input of every MatMul it quantizes with it.
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

from pangu_light.calib.taps import TapBuilder, run_tapped
from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write
from pangu_light.passes.analysis.model_map import ModelMap

__all__ = ["GRAM_FORMAT", "PROJECTIONS", "GramStats", "add_gram_taps", "add_masked_grams", "collect_grams"]

GRAM_FORMAT = "pangu-light-gram/1"
PROJECTIONS = ("o", "down")  # o_proj (attention context in), down_proj (act(gate)*up in)


@dataclasses.dataclass
class GramStats:
    """float64 sums over calibration tokens: ``gram[proj][l]`` [W, W], ``sum[proj][l]`` [W]."""

    gram: dict[str, list[np.ndarray]]
    sum: dict[str, list[np.ndarray]]
    tokens: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def mean(self, proj: str, layer: int) -> np.ndarray:
        return self.sum[proj][layer] / self.tokens

    @property
    def num_layers(self) -> int:
        return len(self.gram["o"])

    def save(self, path: str | os.PathLike) -> None:
        arrays = {"tokens": np.array(self.tokens), "meta": np.array(json.dumps({"format": GRAM_FORMAT, **self.meta}))}
        for proj in PROJECTIONS:
            arrays.update({f"gram.{proj}.{l}": g for l, g in enumerate(self.gram[proj])})
            arrays.update({f"sum.{proj}.{l}": s for l, s in enumerate(self.sum[proj])})
        with atomic_write(path, suffix=".npz") as temporary:
            np.savez(temporary, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GramStats:
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
            meta = json.loads(str(data["meta"]))
            if meta.pop("format", None) != GRAM_FORMAT:
                raise ValueError(f"format is not {GRAM_FORMAT}")
            layers = sum(1 for key in data.files if key.startswith("gram.o."))
            gram = {p: [data[f"gram.{p}.{l}"] for l in range(layers)] for p in PROJECTIONS}
            sums = {p: [data[f"sum.{p}.{l}"] for l in range(layers)] for p in PROJECTIONS}
            return cls(gram, sums, int(data["tokens"]), meta)
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise PanguLightError(f"{path} is not a Gram file written by pangu-light ({error})") from None


@dataclasses.dataclass
class _GramLayout:
    outputs: dict[tuple[str, str, int], str]  # (kind "gram"/"sum", projection, layer) -> graph output


def add_masked_grams(
    model: ir.Model, sources: dict[str, tuple[ir.Value, int]], *, sums: bool = True,
) -> dict[tuple[str, str], str]:
    """Append the Gram (and, with ``sums``, the sum) over real tokens of each source value [B, S, W]
    as graph outputs (in place: use a copy; the graph's other outputs stay). ``sources``: key ->
    (value, its last-axis width W). Returns (kind "gram"/"sum", key) -> output name; outputs are
    named ``gram.<key>`` / ``sum.<key>``."""
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == contract.ATTENTION_MASK), None)
    if mask is None:
        raise PanguLightError("Gram statistics need a graph with an attention_mask input (exported by pangu-light)")
    b = TapBuilder(model, "pangu_light.gram")
    token_mask = b.op("Unsqueeze", b.op("Cast", mask, to=ir.DataType.BOOL), b.const(np.array([-1], np.int64)))
    zero = b.const(np.array(0.0, np.float32))
    first_axis = b.const(np.array([0], np.int64))
    outputs: dict[tuple[str, str], str] = {}
    for key, (value, width) in sources.items():
        rows = b.op("Reshape", b.op("Where", token_mask, value, zero), b.const(np.array([-1, width], np.int64)))
        outputs[("gram", key)] = b.output(b.op("MatMul", b.op("Transpose", rows, perm=[1, 0]), rows), f"gram.{key}")
        if sums:
            outputs[("sum", key)] = b.output(b.op("ReduceSum", rows, first_axis, keepdims=0), f"sum.{key}")
    return outputs


def add_gram_taps(model: ir.Model, model_map: ModelMap | None = None) -> _GramLayout:
    """Replace the graph's outputs by the Gram and sum of every projection input (in place: use a copy)."""
    model_map = model_map or ModelMap.from_model(model)
    sources, projection_of = {}, {}  # "<proj>.<l>" -> (input, width); -> (proj, l)
    for layer in model_map.layers:
        for proj, linear in (("o", layer.attention.o), ("down", layer.ffn.down)):
            key = f"{proj}.{layer.index}"
            sources[key], projection_of[key] = (linear.input, linear.in_features), (proj, layer.index)
    model.graph.outputs.clear()
    outputs = add_masked_grams(model, sources)
    return _GramLayout({(kind, *projection_of[key]): name for (kind, key), name in outputs.items()})


def collect_grams(
    graph_path: str | os.PathLike,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    provider: str = "cpu",
    threads: int | None = None,
    meta: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> GramStats:
    """Run a Gram-tapped copy of the graph at ``graph_path`` over (input_ids, attention_mask)
    batches (the graph itself is not modified; a decode graph runs with an empty past)."""
    model = ir.load(graph_path)
    model_map = ModelMap.from_model(model)
    layout = add_gram_taps(model, model_map)
    layers = len(model_map.layers)
    del model_map
    gram = {p: [0.0] * layers for p in PROJECTIONS}
    sums = {p: [0.0] * layers for p in PROJECTIONS}
    tokens = 0

    def accumulate(outputs: dict[str, np.ndarray], mask: np.ndarray) -> None:
        nonlocal tokens
        for (kind, proj, index), name in layout.outputs.items():
            target = gram if kind == "gram" else sums
            target[proj][index] = target[proj][index] + outputs[name].astype(np.float64)
        tokens += int(mask.sum())

    providers = run_tapped(
        model, batches, list(layout.outputs.values()), accumulate, provider=provider, threads=threads,
        on_batch=on_batch,
    )
    if not tokens:
        raise PanguLightError("no calibration tokens were seen")
    stats_meta = {"graph": str(Path(graph_path).resolve()), "providers": providers, **(meta or {})}
    return GramStats(gram, sums, tokens, stats_meta)
