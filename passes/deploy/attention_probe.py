"""Evaluate the values a decode graph computes once for all layers (rotary cos/sin, attention
masks) by running the graph's own subgraph for them, so the GQA fusion reads their numbers
instead of matching how they are written.

    attention_mask [1, L] of ones --(the graph's nodes upstream of cos, sin, mask)--> values

The subgraph is cut out of a copy of the graph (outputs set to the wanted values, every node
they do not depend on dropped, unread inputs removed) and run by onnx's reference evaluator
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
import onnx_ir.passes.common as common_passes
from onnx.reference import ReferenceEvaluator

from pangu_light.core import contract

__all__ = ["mask_rows", "rotary_tables"]


def _subgraph(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only the values named ``names`` from the inputs they need."""
    proto = ir.serde.serialize_model(model)
    copy = ir.serde.deserialize_model(proto)
    values = {v.name: v for node in copy.graph for v in node.outputs}
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(values[name] for name in names)
    common_passes.RemoveUnusedNodesPass()(copy)
    unread = [value for value in copy.graph.inputs if not value.uses() and value not in copy.graph.outputs]
    for value in unread:
        copy.graph.inputs.remove(value)
    for value in list(copy.graph.initializers.values()):
        if not value.uses():
            copy.graph.initializers.pop(value.name)
    return ir.serde.serialize_model(copy)


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
