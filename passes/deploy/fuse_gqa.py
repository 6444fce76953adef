"""fuse-gqa: each layer's attention of a decode graph becomes one com.microsoft
GroupQueryAttention (rotary inside, KV cache that may share one buffer between past and present).

Our export writes attention in its eager form: the rotary embedding as broadcast Muls with cos/sin
computed from the mask's cumsum, the mask from CumSum/And/LessOrEqual, repeat_kv as Expand and
the cache as Concat. onnxscript's GQA rules expect another rotary and mask form, so this fusion
is written by hand over what the model map knows (the q/k/v/o projections, q/k norms, head
counts, cache inputs and outputs), and reads the numbers (cos/sin tables, window) by running
the graph's own subgraph (``attention_probe``) rather than by matching how they are written::

    q_proj -> [q_norm] -> rotary -.                                   q_proj -[q_norm]-.
    k_proj -> [k_norm] -> rotary -+- Concat(past) - Expand - MatMul    k_proj -[k_norm]-+- GQA -> o_proj
    v_proj ---------------------- Concat(past) - Expand ------'-> o   v_proj -----------'
                                   scale, [tanh cap], + mask, Softmax  past, seqlens_k, total, cos, sin, bias

GQA computes, per head h reading KV group h // (heads / kv_heads), for query position i and key
position j <= i (and j >= i - w for local_window_size w):

    softmax_j(cap * tanh(scale * q_i . k_j / cap) + bias_j) v_j,   q = rope(q), k = rope(k)

with rope(x)[t] = x[t] cos(p theta_t) - x[t + r/2] sin(p theta_t) (and its pair), r the rotary
width (cos_cache is cos(p theta_t), t < r/2; ``rotary_interleaved`` pairs (2t, 2t + 1)).
``scale`` and ``cap`` are read off the nodes between the score MatMul and the Softmax.
Positions: GQA counts them from the start of the buffer, so a left-padded row's real tokens sit
``pad`` positions later than the graph's cumsum positions; rotary scores depend on position
differences only, so the result is the same. The padding is masked by ``attention_bias``
(0 where attention_mask is 1, float32 min where 0), built once for all layers, as are
``seqlens_k = total - 1`` (per row) and ``total_sequence_length = attention_mask.shape[1]``.
``padding_bias=False`` leaves the bias out (GQA then adds nothing to the scores, ~0.5 ms per
SmolLM2 step less, and the bias glue goes): exact only for batches without padding, which the
runtime then enforces (``DecodeLayout.padding_bias``).

Past and present keep their names: fed with a past of P positions, present has P + S (the
graph's contract so far); fed with a buffer of fixed capacity C bound as both past and present,
GQA writes the S new positions in place (ONNX Runtime's past_present_share_buffer).
A layer whose score region or rotary is not of this form is left unfused (``skipped``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pangu_light.core import contract
from pangu_light.passes.analysis.attention_context import attention_context
from pangu_light.passes.analysis.graph_utils import common_prefix, constant_array, in_scope, walk_back
from pangu_light.passes.analysis.map_types import Layer
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.deploy.attention_probe import mask_rows, rotary_tables
from pangu_light.passes.infra.base import Option, PanguPass

__all__ = ["FuseGQAPass", "IO_KIND_GQA"]

IO_KIND_GQA = "gqa-shared-buffer"
_MS = "com.microsoft"


class FuseGQAPass(PanguPass):
    name = "fuse-gqa"
    options_schema = {
        "max_length": Option(int, 4096, "positions in the rotary cos/sin caches (the longest sequence)"),
        "padding_bias": Option(bool, True, "mask padded keys with an attention_bias (False: unpadded batches only)"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        if contract.ATTENTION_MASK not in inputs or not any(n.startswith(contract.PAST_PREFIX) for n in inputs):
            self.count("not_a_decode_graph")
            return ir.passes.PassResult(model, modified=False)
        model_map = ModelMap.from_model(model)
        plans = [self._plan(layer) for layer in model_map.layers]
        if not any(plans):
            self.count("skipped", len(plans))
            return ir.passes.PassResult(model, modified=False)
        length = self.options["max_length"]
        tables = self._rotary(model, plans, length)
        windows = self._windows(model, plans, length)
        tape = ir.tape.Tape(graph)
        common = _common_inputs(
            tape, inputs[contract.INPUT_IDS], inputs[contract.ATTENTION_MASK], self.options["padding_bias"]
        )
        for layer, plan in zip(model_map.layers, plans):
            if plan is None:
                self.count("skipped")
                continue
            if tables.get(plan["cos"].name) is None:
                self.count("skipped_rotary")
                continue
            cos, sin, interleaved = tables[plan["cos"].name]
            self._replace(graph, tape, layer, plan, common, cos, sin, interleaved, windows[plan["mask"].name])
            self.count("fused")
        common_passes.RemoveUnusedNodesPass()(model)
        for value in list(graph.initializers.values()):  # the old attention's shape constants
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)
        common_passes.TopologicalSortPass()(model)
        if self.stats.get("fused"):
            model.opset_imports.setdefault(_MS, 1)
        return ir.passes.PassResult(model, modified=bool(self.stats.get("fused")))

    # -- matching -------------------------------------------------------------------------
    def _plan(self, layer: Layer) -> dict | None:
        """scale, softcap and the shared cos/sin/mask values of ``layer``'s attention, or None."""
        attention = layer.attention
        if attention.past_key is None or attention.present_key is None:
            return None
        scope = common_prefix(attention.q.module, attention.o.module)
        graph = attention.q.matmul.graph
        nodes = [n for n in graph if in_scope(n, scope)]
        softmaxes = [n for n in nodes if n.op_type == "Softmax"]
        if len(softmaxes) != 1:
            return None
        scale, softcap, mask = 1.0, 0.0, None
        current = softmaxes[0].inputs[0]
        ops = []
        while True:
            node = current.producer()
            if node is None or node.op_type == "MatMul":
                break
            constants = [constant_array(v) for v in node.inputs]
            chain = [v for v, c in zip(node.inputs, constants) if c is None and v is not None]
            if node.op_type == "Add" and len(chain) == 2 and mask is None:
                inner = [v for v in chain if v.producer() is not None and v.producer() in nodes
                         and v.producer().op_type in ("Mul", "Div", "Tanh", "MatMul")]
                if len(inner) != 1:
                    return None
                mask = chain[0] if inner[0] is chain[1] else chain[1]
                current = inner[0]
                continue
            scalars = [c for c in constants if c is not None]
            if len(chain) != 1 or (node.op_type != "Tanh" and (len(scalars) != 1 or scalars[0].size != 1)):
                return None
            ops.append((node.op_type, float(scalars[0].reshape(())) if scalars else None))
            current = chain[0]
        # ops from the Softmax back: [Mul cap, Tanh, Div cap,] Mul/Div scale
        if len(ops) >= 3 and ops[1][0] == "Tanh":
            (mul, cap), _, (div, cap2) = ops[:3]
            if mul != "Mul" or div != "Div" or cap != cap2:
                return None
            softcap, ops = cap, ops[3:]
        for op, value in ops:
            if op == "Mul":
                scale *= value
            elif op == "Div":
                scale /= value
            else:
                return None
        if mask is None:
            return None
        shared = [v for v in attention_context(layer).shared if v is not mask and v.dtype == ir.DataType.FLOAT]
        if len(shared) != 2 or not all(_read_as_is(v, set(nodes)) for v in shared):
            return None
        return {
            "head_dim": attention.head_dim, "scale": scale, "softcap": softcap, "mask": mask,
            "cos": shared[0], "sin": shared[1],
        }

    def _rotary(self, model: ir.Model, plans: list, length: int) -> dict:
        """cos/sin caches [length, r/2] per cos value name (None where not a plain rotary)."""
        names = sorted({v.name for p in plans if p for v in (p["cos"], p["sin"])})
        values = dict(zip(names, rotary_tables(model, names, length)))
        tables: dict = {}
        for plan in filter(None, plans):
            a, b = values[plan["cos"].name], values[plan["sin"].name]
            if np.allclose(a[0], 0.0) and np.allclose(b[0], 1.0):  # found them the other way round
                plan["cos"], plan["sin"] = plan["sin"], plan["cos"]
                a, b = b, a
            table = _cache(a, b)
            width = plan["head_dim"]
            if table is not None and (table[0].shape[1] * 2 != width or width % 16):
                table = None  # partial rotary, or a width ORT's GQA refuses (r / 2 a multiple of 8)
            tables[plan["cos"].name] = table
        return tables

    def _windows(self, model: ir.Model, plans: list, length: int) -> dict[str, int]:
        """The GQA local_window_size per mask value: -1 for a causal mask, else the number of
        keys the mask's last row lets through (checked against the unfused graph on sequences
        longer than the window: ``tests/deploy/test_fuse_gqa.py``)."""
        names = sorted({p["mask"].name for p in plans if p})
        windows = {}
        for name, row in zip(names, mask_rows(model, names, length)):
            allowed = int((row > -1e30).sum())
            windows[name] = -1 if allowed >= length else allowed
        return windows

    # -- rewriting ------------------------------------------------------------------------
    def _replace(self, graph, tape, layer, plan, common, cos, sin, interleaved, window) -> None:
        attention = layer.attention
        heads, kv, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        query = _flatten(tape, attention.q_norm, attention.q.output, heads * dim)
        key = _flatten(tape, attention.k_norm, attention.k.output, kv * dim)
        prefix = f"layers.{layer.index}.gqa"
        cos_value = _cached(graph, tape, f"{prefix}.cos_cache", cos)
        sin_value = _cached(graph, tape, f"{prefix}.sin_cache", sin)
        attributes = {
            "num_heads": heads, "kv_num_heads": kv, "scale": plan["scale"], "do_rotary": 1,
            "rotary_interleaved": int(interleaved), "local_window_size": window,
        }
        if plan["softcap"]:
            attributes["softcap"] = plan["softcap"]
        out, present_key, present_value = tape.op_multi_out(
            "GroupQueryAttention",
            [query, key, attention.v.output, attention.past_key, attention.past_value,
             common["seqlens_k"], common["total"], cos_value, sin_value, None, common["bias"]],
            attributes, num_outputs=3, domain=_MS, name=prefix,
        )
        out.shape, out.dtype = attention.context.shape, attention.context.dtype
        for new in (out, present_key, present_value):
            self.tag(new)
        attention.context.replace_all_uses_with(out)
        for old, new in ((attention.present_key, present_key), (attention.present_value, present_value)):
            name, index = old.name, list(graph.outputs).index(old)
            old.name = f"{name}.unfused"
            new.name, new.dtype = name, old.dtype
            new.shape = ir.Shape([old.shape[0], old.shape[1], "present_sequence", old.shape[3]])
            graph.outputs[index] = new


def _read_as_is(table: ir.Value, nodes: set[ir.Node]) -> bool:
    """Whether the attention multiplies by the shared cos (sin) table as it is: only Unsqueeze
    between the table and the Muls. GLM4 reshuffles it (``repeat_interleave`` of its first half,
    for a partial, interleaved rotary): a form this fusion does not take."""
    frontier = [table]
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            node = use.node
            if node not in nodes:
                continue
            if node.op_type == "Unsqueeze":
                frontier.extend(node.outputs)
            elif node.op_type != "Mul":
                return False
    return True


def _cache(cos: np.ndarray, sin: np.ndarray):
    """(cos_cache, sin_cache, interleaved) from tables [L, r] or None when not a plain rotary."""
    width = cos.shape[1]
    if cos.ndim != 2 or width % 2 or not np.allclose(cos[0], 1.0) or not np.allclose(sin[0], 0.0):
        return None
    half = width // 2
    if np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:]):
        return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half]), False
    if np.array_equal(cos[:, 0::2], cos[:, 1::2]) and np.array_equal(sin[:, 0::2], sin[:, 1::2]):
        return np.ascontiguousarray(cos[:, 0::2]), np.ascontiguousarray(sin[:, 0::2]), True
    return None


def _cached(graph: ir.Graph, tape, name: str, array: np.ndarray) -> ir.Value:
    """One initializer per distinct table (layers that share a rotary share its cache)."""
    for value in graph.initializers.values():
        if value.name.endswith(("cos_cache", "sin_cache")) and value.const_value is not None:
            existing = value.const_value.numpy()
            if existing.shape == array.shape and np.array_equal(existing, array):
                return value
    return tape.initializer(ir.tensor(array.astype(np.float32), name=name), name=name)


def _flatten(tape, norm, projection: ir.Value, width: int) -> ir.Value:
    """The q (or k) GQA reads, [b, s, heads * d]: the projection's output, or its per-head norm's
    output [b, s, heads, d] flattened (transposed back first when the norm runs on
    [b, heads, s, d], as in Gemma3: a Transpose between the projection and the norm)."""
    if norm is None:
        return projection
    value = norm.output
    if any(v.producer() is not None and v.producer().op_type == "Transpose"
           for v in walk_back([norm.input], stop={projection})):
        value = tape.op("Transpose", [value], {"perm": [0, 2, 1, 3]})
    shape = tape.initializer(ir.tensor(np.array([0, 0, width], np.int64)), name=f"{norm.output.name}.flat_shape")
    return tape.op("Reshape", [value, shape])


def _common_inputs(tape, input_ids: ir.Value, attention_mask: ir.Value, padding_bias: bool) -> dict:
    """seqlens_k [b] int32, total_sequence_length (scalar int32) and the padding bias
    [b, 1, s, t] (0 where the mask is 1, float32 min where 0; None without ``padding_bias``),
    computed once from the inputs."""

    def const(array, name):
        return tape.initializer(ir.tensor(np.asarray(array), name=f"gqa.{name}"), name=f"gqa.{name}")

    batch = tape.op("Shape", [attention_mask], {"start": 0, "end": 1})
    total_1d = tape.op("Shape", [attention_mask], {"start": 1, "end": 2})
    sequence = tape.op("Shape", [input_ids], {"start": 1, "end": 2})
    total32 = tape.op("Cast", [total_1d], {"to": ir.DataType.INT32})
    total = tape.op("Squeeze", [total32, const(np.array([0], np.int64), "axis0")])
    seqlens = tape.op("Expand", [tape.op("Sub", [total32, const(np.array([1], np.int32), "one_i32")]), batch])
    seqlens.dtype, total.dtype = ir.DataType.INT32, ir.DataType.INT32
    if not padding_bias:
        return {"seqlens_k": seqlens, "total": total, "bias": None}
    keep = tape.op("Cast", [attention_mask], {"to": ir.DataType.FLOAT})
    minimum = const(np.array(np.finfo(np.float32).min, np.float32), "float_min")
    bias2 = tape.op("Mul", [tape.op("Sub", [const(np.array(1.0, np.float32), "one_f32"), keep]), minimum])
    bias4 = tape.op("Unsqueeze", [bias2, const(np.array([1, 2], np.int64), "axes12")])
    shape = tape.op("Concat", [batch, const(np.array([1], np.int64), "one_i64"), sequence, total_1d], {"axis": 0})
    bias = tape.op("Expand", [bias4, shape])
    bias.dtype = ir.DataType.FLOAT
    return {"seqlens_k": seqlens, "total": total, "bias": bias}
