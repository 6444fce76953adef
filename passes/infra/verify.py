"""Check a graph between passes: the ONNX checker, then strict, type-checked shape inference.

Only shapes and types matter here, not weight values, so large initializers are shown to
ONNX as graph inputs of the same type and shape while the checks run (the way
``onnx_ir.passes.common._c_api_utils`` does it): the protobuf stays small (no 2 GiB limit,
no copy of ~540 MB of weights), and small initializers, which carry the shape constants that
shape inference reads (Reshape targets, Concat pieces), stay in. The model is restored
exactly afterwards: same initializers in the same order, same inputs, same tensors.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError

__all__ = ["verify_model"]

# Initializers above this size are replaced by inputs while checking (1 KiB, as in onnx-ir).
_KEEP_BYTES = 1024


_PASS_BUG = "this is a bug in that pass: please report it with the pipeline text"


def verify_model(model: ir.Model, *, where: str, fix: str = _PASS_BUG) -> None:
    """Raise PanguLightError naming ``where`` if ``model`` fails the checker or shape inference.

    The message is one line: ``graph is invalid <where>: <check>: <onnx message>; <fix>``.
    """
    proto = _shape_only_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as error:
        raise PanguLightError(
            f"graph is invalid {where}: ONNX checker: {_one_line(error)}; {fix}"
        ) from None
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        raise PanguLightError(
            f"graph is invalid {where}: shape inference: {_one_line(error)}; {fix}"
        ) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _shape_only_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` with its large initializers turned into typed graph inputs."""
    graph = model.graph
    saved_initializers = list(graph.initializers.values())
    saved_inputs = list(graph.inputs)
    saved = []  # (value, const_value, shape, dtype) for each value we touch
    try:
        for value in saved_initializers:
            tensor = value.const_value
            saved.append((value, tensor, value.shape, value.dtype))
            if tensor is None or tensor.nbytes > _KEEP_BYTES:
                if tensor is not None:
                    if value.shape is None:
                        value.shape = tensor.shape
                    if value.dtype is None:
                        value.dtype = tensor.dtype
                del graph.initializers[value.name]
                if value not in saved_inputs:
                    graph.inputs.append(value)
        return ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(saved_inputs)
        graph.initializers.clear()
        for value, tensor, shape, dtype in saved:
            value.const_value = tensor
            value.shape = shape
            value.dtype = dtype
            graph.initializers.add(value)
