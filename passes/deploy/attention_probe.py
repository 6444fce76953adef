"""Evaluate the values a decode graph computes once for all layers (rotary cos/sin, attention
masks) by running the graph's own subgraph for them, so the GQA fusion reads their numbers
instead of matching how they are written.

    attention_mask [1, L] of ones --(the graph's nodes upstream of cos, sin, mask)--> values

The subgraph is cut out of the graph (the nodes the wanted values depend on, the inputs and
initializers those read; nothing else is copied) and run by onnx's reference evaluator
(pure numpy, no ONNX Runtime: passes must not import it). Two probes:

* ``rotary_tables(model, values, length)``: a prefill of ``length`` tokens (past length 0):
  each value as [length, width] (position p in row p), e.g. cos(p * inv_freq) for width
  columns;
* ``mask_rows(model, values, length)``: one decode step at position ``length - 1`` (past of
  ``length - 1`` zeros, fed only to the inputs the subgraph still reads): the additive mask's
  last row [length], from which a sliding window reads as the count of 0 entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from pangu_light.core import contract

__all__ = ["mask_rows", "rotary_tables"]


def _subgraph(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    """The nodes of ``model`` that the values named ``names`` depend on, with only the inputs and
    initializers those nodes read, as a model computing ``names`` (the weights of the rest of the
    graph are never copied: the probe of a 7B model stays small)."""
    graph = model.graph
    by_name = {v.name: v for node in graph for v in node.outputs}
    needed: set[ir.Node] = set()
    stack = [by_name[name] for name in names]
    seen: set[ir.Value] = set()
    while stack:
        value = stack.pop()
        if value is None or value in seen:
            continue
        seen.add(value)
        node = value.producer()
        if node is not None and node not in needed:
            needed.add(node)
            stack.extend(node.inputs)
    nodes = [node for node in graph if node in needed]
    read = {v for node in nodes for v in node.inputs if v is not None}
    inputs = [v for v in graph.inputs if v in read]
    initializers = [v for v in graph.initializers.values() if v in read and v.const_value is not None]
    proto_graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes],
        "attention_probe",
        [ir.serde.serialize_value(v) for v in inputs],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names],
        [_named(ir.serde.serialize_tensor(v.const_value), v.name) for v in initializers],
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return onnx.helper.make_model(proto_graph, opset_imports=opsets, ir_version=model.ir_version)


def _named(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    tensor.name = name
    return tensor


def _feeds(proto: onnx.ModelProto, input_length: int, mask_length: int) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for spec in proto.graph.input:
        if spec.name == contract.INPUT_IDS:
            feeds[spec.name] = np.zeros((1, input_length), np.int64)
        elif spec.name == contract.ATTENTION_MASK:
            feeds[spec.name] = np.ones((1, mask_length), np.int64)
        elif spec.name.startswith(contract.PAST_PREFIX):
            dims = [d.dim_value for d in spec.type.tensor_type.shape.dim]
            feeds[spec.name] = np.zeros((1, dims[1], mask_length - input_length, dims[3]), np.float32)
        else:
            raise ValueError(f"probe subgraph reads input {spec.name!r}, which is not one of ours")
    return feeds


def _run(model: ir.Model, names: Sequence[str], input_length: int, mask_length: int) -> list[np.ndarray]:
    proto = _subgraph(model, names)
    evaluator = ReferenceEvaluator(proto)
    return evaluator.run(None, _feeds(proto, input_length, mask_length))


def rotary_tables(model: ir.Model, names: Sequence[str], length: int) -> list[np.ndarray]:
    """Each named value of a ``length``-token prefill, as [length, width] (batch and any unit
    axes dropped)."""
    results = _run(model, names, length, length)
    tables = []
    for array in results:
        array = np.asarray(array, dtype=np.float32)
        tables.append(array.reshape(length, -1) if array.size % length == 0 else array)
    return tables


def mask_rows(model: ir.Model, names: Sequence[str], length: int) -> list[np.ndarray]:
    """The last row [length] of each named additive mask, at one decode step whose key length
    is ``length``."""
    results = _run(model, names, 1, length)
    return [np.asarray(array, dtype=np.float32).reshape(-1)[-length:] for array in results]
