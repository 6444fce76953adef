"""A hand-built ``y = MatMul(x, W)`` graph and toy passes, for testing the pass machinery
(manager, compile command) apart from any real rewrite."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pangu_light.passes.infra.base import Option, PanguPass

W_VALUES = np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0


def build_model(w: np.ndarray = W_VALUES) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([2, w.shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="W", const_value=ir.tensor(w, name="W"))
    weight.shape = ir.Shape(w.shape)
    weight.dtype = ir.DataType.FLOAT
    node = ir.node("MatMul", [x, weight], name="matmul")
    y = node.outputs[0]
    y.name = "y"
    y.shape = ir.Shape([2, w.shape[1]])
    y.dtype = ir.DataType.FLOAT
    graph = ir.Graph([x], [y], nodes=[node], initializers=[weight], opset_imports={"": 18}, name="toy")
    return ir.Model(graph, ir_version=10)


class ScaleWeightPass(PanguPass):
    """Multiplies every float initializer by ``factor`` and tags it."""

    name = "scale-weight"
    options_schema = {"factor": Option(float, default=2.0)}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy().astype(np.float64) * self.options["factor"]
            value.const_value = ir.tensor(array.astype(np.float32), name=value.name)
            self.tag(value)
            self.count("initializers_scaled")
            self.count("elements_scaled", int(array.size))
        return ir.passes.PassResult(model, modified=True)


class NoOpPass(PanguPass):
    name = "no-op"
    options_schema = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=False)


class BreakShapePass(PanguPass):
    """Deliberately wrong: gives W a row more, so MatMul(x[2,4], W[5,3]) no longer types."""

    name = "break-shape"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers["W"]
        value.const_value = ir.tensor(np.ones((5, 3), np.float32), name="W")
        value.shape = ir.Shape([5, 3])
        return ir.passes.PassResult(model, modified=True)
