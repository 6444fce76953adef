"""The no-cache graph cut into a chain of one-layer sessions, for the layer probe: the residual
stream entering every layer computed once, each probe run from its own layer on, and the
next-token NLL computed inside the graph.

The chain. With x_l the residual stream entering layer l (``ModelMap``'s ``layer.input``)::

    embed:    (input_ids, attention_mask)              -> x_0
    piece l:  (x_l, attention_mask, W_o,l, W_down,l)   -> x_l+1        l < n - 1
    piece n-1: (x_n-1, attention_mask, W_o, W_down, targets) -> nll     (last layer, final norm, lm_head)

Each piece is the part of the graph between x_l (a graph input of the piece) and its output
(``cut``); the rotary and mask subgraphs stay in every piece, recomputed from
attention_mask (and input_ids where the export reads it), so no piece needs another's
intermediates but x. The probe of layer l changes only layer l's projections, so x_0..x_l are
those of the unchanged model: one run of the chain with the original weights stores them (and the
base NLL), and each probe of layer l runs pieces l..n-1 only, about half the model on average.
All pieces' sessions together hold the model's weights once (plus the embedding, in the embed
session, freed after the base run), as the one session of the whole graph did.

Every piece runs the same float32 operations on the same float32 x_l that the whole graph
would, except where ONNX Runtime fuses nodes across a cut in the whole graph (a residual Add
into the next RMSNorm): the fused kernel may round the same sums in another order, a float32
rounding difference at most (on SmolLM2-135M the logits came out the same: with a float64 NLL
the rises agreed with the whole graph's to 1e-15; with the float32 NLL below, within 1.9e-6
against a smallest rise of 4.1e-4, and prune's plan was identical). The base
run and every probe share the chain, so their rises compare like with like. The sessions run
one after another, so their idle threads must not spin (``create_session(spinning=False)``): a
spinning pool of the piece before takes the cores from the next (measured: 2x slower on 2 cores).

The NLL output. A probe needs the NLL of each predicted token, not the [B, L, V] logits (25 MB of
float32 per 128-token SmolLM2 sequence, copied out and log-softmaxed in float64 numpy before, as
``calib.evaluate.token_nll`` does). The last piece computes it in float32::

    logits z [B, L, V] --Slice(:, :-1)--LogSoftmax(-1)--GatherElements(targets)--Neg--> nll [B, L - 1, 1]
        targets [B, L - 1, 1] = ids[:, 1:] (int64, fed)

It differs from ``token_nll`` on the same logits by float32 rounding only. With u = 2^-24 and m
the row's largest logit, LogSoftmax computes z_t - m - log S, S = sum_i exp(z_i - m) >= 1: each
exp(z_i - m) is within (2 + |z_i - m|) u of its value relative (the subtraction's rounding moves
the exponent), |z_i - m| exp(z_i - m) <= 1/e, and summing V positive terms adds at most (V - 1) u
relative, so log S is within (1.4 V + 2) u absolute; the subtraction and log add (|z_t - m| +
log S + nll) u. Per token::

    |nll - token_nll| <= (1.4 V + 4 + 3 (|z_t - m| + log V)) u       (worst case; 4e-3 at V = 49152)

and a rise, a mean of differences of two such NLLs, is within twice the largest. The bound is
for any summation order; ONNX Runtime's vectorised sum does far better: 1.3e-5 at most per token
on SmolLM2 (the float64 LogSoftmax of ``token_nll`` in the graph costs 0.08 s per probe more on 2
threads, half the cost of the lm_head, for rises that moved by 1e-15 instead of 1e-6).
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model

__all__ = ["NLL", "OUT", "RESIDUAL", "TARGETS", "LayerChain", "add_nll_output", "cut"]

NLL, TARGETS = "pangu_light.probe.nll", "pangu_light.probe.targets"
RESIDUAL, OUT = "pangu_light.probe.residual", "pangu_light.probe.out"


def _node(graph: ir.Graph, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
    node = ir.node(op_type, list(inputs), attributes=attributes)
    graph.append(node)
    node.outputs[0].name = f"pangu_light.probe.{len(graph)}.{op_type}"
    return node.outputs[0]


def _const(graph: ir.Graph, array: np.ndarray) -> ir.Value:
    return _node(graph, "Constant", value=ir.tensor(array))


def add_nll_output(model: ir.Model) -> None:
    """Make the per-token NLL ``NLL`` [B, L - 1, 1] (float32) the graph's only output, with the
    targets ``ids[:, 1:, None]`` a new int64 input ``TARGETS`` (in place)."""
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == contract.LOGITS), None)
    if logits is None:
        raise PanguLightError(f"the layer probe needs the graph's {contract.LOGITS!r} output")
    targets = ir.Value(name=TARGETS, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "targets", 1]))
    graph.inputs.append(targets)
    graph.outputs.clear()
    axis = _const(graph, np.array([1], np.int64))
    predicting = _node(graph, "Slice", logits, _const(graph, np.array([0], np.int64)),
                       _const(graph, np.array([-1], np.int64)), axis)  # logits[:, :-1]
    log_probs = _node(graph, "LogSoftmax", predicting, axis=-1)
    nll = _node(graph, "Neg", _node(graph, "GatherElements", log_probs, targets, axis=-1))
    nll.name = NLL
    graph.outputs.append(nll)


def cut(model: ir.Model, start: str | None, end: str | None, inputs: tuple[str, ...] = ()) -> ir.Model:
    """The part of ``model`` that computes value ``end`` (renamed ``OUT``; None: the NLL of
    ``add_nll_output``) from value ``start`` (a graph input renamed ``RESIDUAL``; None: from the
    graph inputs) and the graph inputs it still reads, with the initializers named in ``inputs``
    made graph inputs: a new model (``ir.convenience.extract`` copies only the nodes it needs;
    the tensors are shared)."""
    graph = model.graph
    output = contract.LOGITS if end is None else end
    bounds = [*graph.inputs, *([] if start is None else [start])]
    piece = ir.Model(ir.convenience.extract(graph, bounds, [output]), ir_version=model.ir_version)
    graph = piece.graph
    if start is not None:
        graph.inputs[-1].name = RESIDUAL
    if end is None:
        add_nll_output(piece)
    else:
        graph.outputs[0].name = OUT
    for name in inputs:
        value = graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
    used = {v for node in graph.all_nodes() for v in node.inputs if v is not None} | set(graph.outputs)
    for unused in [v for v in graph.inputs if v not in used]:
        graph.inputs.remove(unused)
    return piece


class LayerChain:
    """The embed session and one session per layer of the no-cache graph at ``path`` (see the
    module docstring); ``weights`` holds each layer's o_proj and down_proj weights, the inputs the
    probe replaces. Use as a context manager: the sessions hold the model's weights."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        from pangu_light.calib.half import say_float32_copy, widen_to_float32

        model = load_model(path)
        half = widen_to_float32(model)  # a half graph probes as its float32 copy, as calibration does
        if half is not None:
            say_float32_copy(half, "the layer probe")
        self.model_map = ModelMap.from_model(model)
        if self.model_map.graph_kind != "no-cache":
            raise PanguLightError("the layer probe runs on the no-cache graph (original.onnx), not a decode graph")
        layers = self.model_map.layers
        self.weights: dict[str, np.ndarray] = {}
        for layer in layers:
            for linear in (layer.attention.o, layer.ffn.down):
                self.weights.setdefault(linear.weight.name, np.asarray(linear.weight.const_value.numpy(), np.float32))
        starts = [layer.input.name for layer in layers]
        mapped = half is None
        self.embed = self._session(model, None, starts[0], threads, mapped)
        self.pieces = [
            self._session(model, starts[i], starts[i + 1] if i + 1 < len(starts) else None, threads, mapped,
                          (layers[i].attention.o.weight.name, layers[i].ffn.down.weight.name))
            for i in range(len(layers))
        ]

    @staticmethod
    def _session(model: ir.Model, start: str | None, end: str | None, threads: int | None, mapped: bool,
                 weights: tuple[str, ...] = ()):
        """An ORT session of a cut copy of ``model`` (``cut``), and its input names. Its idle
        threads do not spin: the pieces run one after another, and a spinning pool would take the
        cores from the next piece's."""
        from pangu_light.calib.taps import saved_for_session
        from pangu_light.runtime.session import create_session

        piece = cut(model, start, end, tuple(dict.fromkeys(weights)))
        with saved_for_session(piece, mapped=mapped) as saved:
            del piece
            session = create_session(saved, provider="cpu", threads=threads, spinning=False).session
        return session, {spec.name for spec in session.get_inputs()}

    def __enter__(self) -> LayerChain:
        return self

    def __exit__(self, *exc) -> None:
        self.embed = self.pieces = None

    @staticmethod
    def _run(piece, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session, names = piece
        return session.run([output], {name: value for name, value in feeds.items() if name in names})[0]

    def residuals(self, ids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """The residual stream entering every layer for token ``ids`` [B, L] under the original
        weights, and their NLL [B, L - 1]."""
        feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids)}
        stream = [self._run(self.embed, OUT, feeds)]
        for index in range(len(self.pieces) - 1):
            stream.append(self._run(self.pieces[index], OUT, {**feeds, RESIDUAL: stream[-1], **self.weights}))
        return stream, self.nll(ids, stream[-1], len(self.pieces) - 1)

    def nll(self, ids: np.ndarray, residual: np.ndarray, index: int,
            override: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The NLL [B, L - 1] (float32 values, as float64) of ``ids`` [B, L] with ``residual``
        entering layer ``index`` and the ``override`` weights fed in place of the originals."""
        weights = {**self.weights, **(override or {})}
        feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids), TARGETS: ids[:, 1:, None]}
        for piece in self.pieces[index:-1]:
            residual = self._run(piece, OUT, {**feeds, RESIDUAL: residual, **weights})
        return self._run(self.pieces[-1], NLL, {**feeds, RESIDUAL: residual, **weights})[..., 0].astype(np.float64)

    def free_embed(self) -> None:
        """Drop the embed session (only the base run needs it)."""
        self.embed = None

