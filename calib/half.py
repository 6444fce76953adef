"""Half-precision graphs run as float32 copies where ONNX Runtime's CPU provider lacks kernels.

ONNX Runtime's CPU provider has no bfloat16 kernels for Where, MatMul, Softmax and most other
ops, and runs float16 ops that lack kernels by casting around them. So calibration (every tapped
run: statistics, Gram matrices, rotation moments) and evaluation on the CPU run a float32 copy
of a float16/bfloat16 graph, and say so in one line::

    half initializer w           ->  float32 w (exact: every half value is a float32 value)
    Cast(half <-> float32)       ->  removed (the torch modules' .to(float32) and back)
    half inputs, outputs, values ->  float32 (past/present cache, logits)

so the copy has the float32 export's structure (the model map and the passes read it as one).

The copy computes the half graph's function with its half-rounded weights in float32
arithmetic: what the float32 export of the same rounded weights computes (the constants the
exporter rounded to the half dtype, e.g. Gemma's sqrt(hidden) scale, stay rounded). Weights are
widened lazily, one tensor at a time, when the copy is saved for ONNX Runtime. Statistics are
accumulated in float64 as for any graph.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["HALF", "file_half_dtype", "float32_copy_for_cpu", "say_float32_copy", "widen_to_float32"]

HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def widen_to_float32(model: ir.Model) -> ir.DataType | None:
    """Make ``model`` (in place; use a copy) compute in float32; the half dtype it held, or None
    (then nothing changed)."""
    graph = model.graph
    found: ir.DataType | None = None
    # Casts between float32 and a half dtype: identities in the copy, removed (found first,
    # before the values they read are retyped)
    casts = [node for node in graph if node.op_type == "Cast" and node.inputs[0] is not None
             and (node.inputs[0].dtype in HALF or ir.DataType(node.attributes["to"].value) in HALF)]
    for value in graph.initializers.values():
        tensor = value.const_value
        if value.dtype in HALF and tensor is not None:
            found = value.dtype
            value.const_value = _widened(tensor)
            value.dtype = ir.DataType.FLOAT
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for name, attribute in list(node.attributes.items()):
            if node.op_type == "Cast" and name == "to" and ir.DataType(attribute.value) in HALF:
                found = ir.DataType(attribute.value)
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
            elif attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype in HALF:
                found = attribute.value.dtype
                array = attribute.value.numpy().astype(np.float32)
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(array, name=attribute.value.name))
        for value in node.outputs:
            if value.dtype in HALF:
                found = found or value.dtype
                value.dtype = ir.DataType.FLOAT
    for value in [*graph.inputs, *graph.outputs]:
        if value.dtype in HALF:
            found = found or value.dtype
            value.dtype = ir.DataType.FLOAT
    for node in casts:
        source, result = node.inputs[0], node.outputs[0]
        if source.dtype == ir.DataType.FLOAT and not result.is_graph_output():
            result.replace_all_uses_with(source)
            graph.remove(node, safe=True)
    return found


def _widened(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    def convert() -> ir.Tensor:
        return ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name)

    return ir.LazyTensor(convert, dtype=ir.DataType.FLOAT, shape=tensor.shape, name=tensor.name)


def say_float32_copy(dtype: ir.DataType, what: str) -> None:
    """The one line that says a half graph runs as a float32 copy."""
    print(
        f"note: {what} runs a float32 copy of this {dtype.name.lower()} graph (weights widened exactly; "
        "ONNX Runtime's CPU provider lacks half-precision kernels)",
        file=sys.stderr, flush=True,
    )


def file_half_dtype(path: str | os.PathLike) -> ir.DataType | None:
    """The half dtype of the logits of the graph at ``path`` (read without its weights), or None;
    None too for a file that cannot be read as ONNX (the session that loads it says why)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # missing, truncated or not ONNX: create_session gives the clear error
        return None
    for output in proto.graph.output:
        dtype = ir.DataType(output.type.tensor_type.elem_type)
        if dtype in HALF:
            return dtype
    return None


@contextmanager
def float32_copy_for_cpu(path: str | os.PathLike, what: str, provider: str = "cpu") -> Iterator[Path]:
    """``path`` itself for a float32 graph or a provider other than the CPU; for a half graph on
    the CPU, a float32 copy in a temporary directory (weights in a side file, widened one tensor
    at a time), removed on exit. A session created inside the block holds the weights, so the
    copy can go when the block ends."""
    from pangu_light.runtime.session import resolve_provider

    dtype = file_half_dtype(path) if resolve_provider(provider) == "cpu" else None
    if dtype is None:
        yield Path(path)
        return
    say_float32_copy(dtype, what)
    model = ir.load(path)
    widen_to_float32(model)
    with tempfile.TemporaryDirectory(prefix="pangu-light-float32-") as workdir:
        copy = Path(workdir) / "float32.onnx"
        ir.save(model, copy, external_data="float32.onnx.data")
        del model
        yield copy
