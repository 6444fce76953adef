"""Statistic taps: reductions added to a copy of the graph so ORT computes what calibration needs.

The statistics of the method are sums over tokens of functions of intermediate values. The
values themselves are [batch, seq, width] per layer, far too much to copy out of the session
(SmolLM2-135M at 8 x 256 tokens: ~0.7 GB per batch), so each tap adds a small reduction after
the value it reads and makes only the per-sample result a graph output. Padding never counts:
every per-token term goes through ``Where(mask, term, 0)`` before the sum over the sequence
(a padded position may hold anything, even NaN)::

    y = RMSNorm_l(x)      [B,S,H] --Abs--Where(mask)--ReduceSum(S)-->   tap.channel.<norm>  [B,H]
    context (o_proj in)   [B,S,n*d] --Reshape[B,S,n,d]--ReduceL2(d)--Where--ReduceSum(S)-->
                                                                         tap.head.<l>     [B,n]
    act(g)*u (down in)    [B,S,F] --Abs--Where--ReduceSum(S)-->          tap.ffn.<l>      [B,F]
    layer in x, out y     [B,S,H] --cos(x,y) [B,S]--Where--ReduceSum(S)--> tap.cos.<l>    [B]
    post-norm 1/rms(x)    [B,S,1] (the norm's own Reciprocal) --Where--ReduceSum(S,1)-->
                                                                         tap.s_inv.<norm> [B]
                          ... --Log--, and its square, --Where--ReduceSum(S,1)-->
                                                   tap.s_inv_log.<norm>, tap.s_inv_log2.<norm> [B]

The tapped graph outputs only the taps (not the logits), so ORT skips the lm_head: the
statistics cost less than a plain forward. Sums inside one batch are float32; the caller
accumulates batches in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap, Norm

__all__ = [
    "TapBuilder",
    "TapLayout",
    "TappedSession",
    "add_statistic_taps",
    "run_tapped",
    "saved_for_session",
    "tap_values",
    "tapped_session",
]


@dataclasses.dataclass
class TapLayout:
    """Which graph output holds which statistic (names are the graph outputs)."""

    channel: dict[str, str]  # hidden norm gamma name -> output [B, H]
    heads: list[str]  # per layer -> output [B, num_heads]
    ffn: list[str]  # per layer -> output [B, F]
    cosine: list[str]  # per layer -> output [B]
    s_inv: dict[str, str]  # post-norm gamma name -> output [B]
    mask_name: str
    # post-norm gamma name -> (sum of log 1/rms, sum of its square) outputs [B]: how spread it is
    s_inv_log: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    def outputs(self) -> list[str]:
        spreads = [name for pair in self.s_inv_log.values() for name in pair]
        return [*self.channel.values(), *self.heads, *self.ffn, *self.cosine, *self.s_inv.values(), *spreads]


class TapBuilder:
    """Appends nodes to a graph, each output named ``<prefix>.<n>.<op>`` (one prefix per kind of
    tap, so taps added to one graph by different builders never share a name)."""

    def __init__(self, model: ir.Model, prefix: str = "pangu_light.tap"):
        self.graph = model.graph
        self.prefix = prefix
        self.count = 0

    def const(self, array: np.ndarray) -> ir.Value:
        node = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
        self.graph.append(node)
        return node.outputs[0]

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes)
        self.graph.append(node)
        self.count += 1
        node.outputs[0].name = f"{self.prefix}.{self.count}.{op_type}"
        return node.outputs[0]

    def output(self, value: ir.Value, name: str) -> str:
        out = self.op("Identity", value)
        out.name = name
        out.dtype = ir.DataType.FLOAT
        self.graph.outputs.append(out)
        return name


def add_statistic_taps(model: ir.Model, model_map: ModelMap | None = None) -> TapLayout:
    """Add the reductions and outputs in place (use a copy: ``ir.load`` the graph again).

    All previous outputs are removed: the tapped graph computes statistics only."""
    model_map = model_map or ModelMap.from_model(model)
    graph = model.graph
    mask_input = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask_input is None:
        raise PanguLightError("calibration needs a graph with an attention_mask input (exported by pangu-light)")
    graph.outputs.clear()
    b = TapBuilder(model)
    seq_axis = b.const(np.array([1], np.int64))
    seq_and_last = b.const(np.array([1, 2], np.int64))
    last_axis = b.const(np.array([-1], np.int64))
    zero = b.const(np.array(0.0, np.float32))
    # The mask covers past + current tokens; calibration runs with an empty past, so it is [B, S].
    token_mask = b.op("Cast", mask_input, to=ir.DataType.BOOL)  # [B, S]
    token_mask3 = b.op("Unsqueeze", token_mask, last_axis)  # [B, S, 1]

    def masked_sum(term: ir.Value, mask: ir.Value, axes: ir.Value) -> ir.Value:
        return b.op("ReduceSum", b.op("Where", mask, term, zero), axes, keepdims=0)

    layout = TapLayout({}, [], [], [], {}, mask_input.name)
    for norm in model_map.hidden_norms():
        value = masked_sum(b.op("Abs", norm.output), token_mask3, seq_axis)
        layout.channel[norm.gamma.name] = b.output(value, f"tap.channel.{norm.gamma.name}")
    for layer in model_map.layers:
        attention = layer.attention
        heads_shape = b.const(np.array([0, 0, attention.num_heads, attention.head_dim], np.int64))
        per_head = b.op("Reshape", attention.context, heads_shape)  # [B, S, n, d]
        head_norm = b.op("ReduceL2", per_head, b.const(np.array([3], np.int64)), keepdims=0)  # [B, S, n]
        layout.heads.append(b.output(masked_sum(head_norm, token_mask3, seq_axis), f"tap.head.{layer.index}"))

        neurons = b.op("Abs", layer.ffn.down.input)
        layout.ffn.append(b.output(masked_sum(neurons, token_mask3, seq_axis), f"tap.ffn.{layer.index}"))

        x, y = layer.input, layer.output
        dot = b.op("ReduceSum", b.op("Mul", x, y), last_axis, keepdims=0)
        norms = b.op("Mul", b.op("ReduceL2", x, last_axis, keepdims=0), b.op("ReduceL2", y, last_axis, keepdims=0))
        cosine = b.op("Div", dot, norms)  # [B, S]
        layout.cosine.append(b.output(masked_sum(cosine, token_mask, seq_axis), f"tap.cos.{layer.index}"))

        for role in ("post_attn", "post_ffn"):
            norm = layer.norms.get(role)
            if norm is None:
                continue
            inverse_rms = _inverse_rms(norm)
            layout.s_inv[norm.gamma.name] = b.output(
                masked_sum(inverse_rms, token_mask3, seq_and_last), f"tap.s_inv.{norm.gamma.name}"
            )
            log_inverse = b.op("Log", inverse_rms)
            layout.s_inv_log[norm.gamma.name] = (
                b.output(masked_sum(log_inverse, token_mask3, seq_and_last), f"tap.s_inv_log.{norm.gamma.name}"),
                b.output(
                    masked_sum(b.op("Mul", log_inverse, log_inverse), token_mask3, seq_and_last),
                    f"tap.s_inv_log2.{norm.gamma.name}",
                ),
            )
    return layout


def tap_values(model: ir.Model, values: dict[str, ir.Value]) -> list[str]:
    """Make each value a graph output under its key, through an Identity node, and the only outputs
    (in place: use a copy); returns the output names."""
    graph = model.graph
    graph.outputs.clear()
    for name, value in values.items():
        node = ir.node("Identity", [value])
        graph.append(node)
        node.outputs[0].name = name
        node.outputs[0].dtype = value.dtype
        graph.outputs.append(node.outputs[0])
    return list(values)


def _inverse_rms(norm: Norm) -> ir.Value:
    """The norm's own 1 / sqrt(mean(x^2) + eps), [B, S, 1]: the Reciprocal node of its chain."""
    reciprocal = next((n for n in norm.nodes if n.op_type == "Reciprocal"), None)
    if reciprocal is None:
        raise PanguLightError(
            f"norm {norm.module}: no Reciprocal node in its RMSNorm chain "
            f"({', '.join(n.op_type for n in norm.nodes)}); cannot tap 1/rms for post-norm absorption"
        )
    return reciprocal.outputs[0]


def run_tapped(
    model: ir.Model,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    names: list[str],
    consume: Callable[[dict[str, np.ndarray], np.ndarray], None],
    *,
    mask_name: str = contract.ATTENTION_MASK,
    provider: str = "cpu",
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Run a tapped ``model`` (it is consumed: its unused nodes, e.g. the lm_head, are removed)
    over (input_ids, attention_mask) ``batches``, calling ``consume(outputs by name, mask)`` per
    batch; a decode graph runs with an empty past. Returns the providers used (see
    ``tapped_session`` for how the graph reaches ONNX Runtime)."""
    with tapped_session(model, provider=provider, threads=threads) as tapped:
        for input_ids, mask in batches:
            consume(tapped.run(names, input_ids, mask, mask_name), mask)
            if on_batch is not None:
                on_batch(int(mask.sum()))
        return tapped.providers


@dataclasses.dataclass
class TappedSession:
    """An ORT session of a tapped graph; ``run`` feeds one batch (and an empty past to a decode graph)."""

    session: Any
    cache: Any  # runtime.layout.DecodeLayout of a decode graph, else None
    providers: list[str]

    def run(self, names: list[str], input_ids: np.ndarray, mask: np.ndarray,
            mask_name: str = contract.ATTENTION_MASK) -> dict[str, np.ndarray]:
        feeds = {contract.INPUT_IDS: input_ids.astype(np.int64), mask_name: mask.astype(np.int64)}
        if self.cache is not None:
            feeds.update(self.cache.empty_past(input_ids.shape[0]))
        return dict(zip(names, self.session.run(names, feeds)))


@contextlib.contextmanager
def tapped_session(model: ir.Model, *, provider: str = "cpu", threads: int | None = None) -> Iterator[TappedSession]:
    """An ORT session of a tapped ``model`` (consumed: its unused nodes are removed first).

    ONNX Runtime reads models from files. A graph loaded from a file with external data keeps
    its weights there: the tapped graph (nodes and the taps' small constants only) is written
    beside that data file, referencing it, and removed once the session holds the weights, so
    no weight is copied. A graph whose weights are in memory is written whole to a temporary
    directory instead. A float16/bfloat16 graph runs as its float32 copy (``calib.half``), said
    in one line on stderr."""
    from pangu_light.calib.half import say_float32_copy, widen_to_float32
    from pangu_light.runtime.layout import DecodeLayout
    from pangu_light.runtime.session import create_session

    common_passes.RemoveUnusedNodesPass()(model)
    decode = any(contract.is_past_input(v.name) for v in model.graph.inputs)
    half = widen_to_float32(model)  # statistics of a half graph: from its float32 copy
    if half is not None:
        say_float32_copy(half, "calibration")
    with saved_for_session(model, mapped=half is None) as tapped:
        del model
        info = create_session(tapped, provider=provider, threads=threads)
    cache = DecodeLayout.from_session(info.session, require_outputs=False) if decode else None
    yield TappedSession(info.session, cache, info.providers_in_use)


@contextlib.contextmanager
def saved_for_session(model: ir.Model, mapped: bool = True) -> Iterator[Path]:
    """The path of ``model`` saved for ONNX Runtime, removed on exit (see ``run_tapped``);
    ``mapped=False`` (weights widened to float32) always writes a whole copy."""
    base_dirs = {
        Path(value.const_value.base_dir).resolve()
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    if len(base_dirs) == 1 and mapped:
        (base_dir,) = base_dirs
        if os.access(base_dir, os.W_OK):
            path = base_dir / f".pangu-light-tapped-{secrets.token_hex(4)}.onnx"
            try:
                ir.save(model, path)  # external tensors keep their file and offsets
                yield path
            finally:
                path.unlink(missing_ok=True)
            return
    with tempfile.TemporaryDirectory(prefix="pangu-light-tapped-") as workdir:
        path = Path(workdir) / "tapped.onnx"
        ir.save(model, path, external_data="tapped.onnx.data")
        yield path
