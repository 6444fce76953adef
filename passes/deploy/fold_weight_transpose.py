"""fold-weight-transpose: store each weight the way MatMul reads it, so no Transpose runs on it.

Our exporter writes every Linear as ``MatMul(x, Transpose(W))`` with ``W`` the PyTorch weight
[out, in]. ONNX Runtime's weight-only quantizer (``MatMulNBitsQuantizer``) only quantizes a MatMul
whose second input *is* an initializer, so it skips all of them ("MatMul doesn't have const
weight"). This pass folds the constant::

    W [out, in] --Transpose(perm)--> W^T --MatMul(x, .)-->      becomes      W_T [in, out] --MatMul(x, .)-->

with ``W_T = transpose(W, perm)`` computed once in numpy (a pure copy: the bits of every
element are unchanged, so the graph computes exactly the same function).

A weight that something else also reads (a tied embedding: ``Gather(W)`` for the input and
``Transpose(W)`` for the lm_head) would be stored twice after folding. With ``shared=false``
(the default) such Transposes are left alone (counted as ``skipped_shared``); ``shared=true``
folds them too, which is what a quantized lm_head needs (the embedding keeps ``W``, the
lm_head gets its own [in, out] copy for the quantizer). A Transpose whose output is a graph
output is never folded (the output's name would change).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pangu_light.passes.infra.base import Option, PanguPass

__all__ = ["FoldWeightTransposePass"]


class FoldWeightTransposePass(PanguPass):
    name = "fold-weight-transpose"
    options_schema = {
        "shared": Option(bool, False, "also fold weights other nodes read (stores them twice)"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = set(graph.outputs)
        folded: dict[tuple[int, tuple[int, ...]], ir.Value] = {}
        modified = False
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                continue
            weight, result = node.inputs[0], node.outputs[0]
            if weight is None or not weight.is_initializer() or weight.const_value is None:
                continue
            if weight in graph.inputs or result in outputs:
                continue
            if len(weight.uses()) > 1 and not self.options["shared"]:
                self.count("skipped_shared")
                continue
            array = weight.const_value.numpy()
            perm = tuple(node.attributes.get_ints("perm", None) or reversed(range(array.ndim)))
            key = (id(weight), perm)
            if key not in folded:
                folded[key] = self._new_initializer(graph, weight, np.ascontiguousarray(array.transpose(perm)))
                self.count("weights_folded")
            result.replace_all_uses_with(folded[key])
            graph.remove(node, safe=True)
            self.count("transposes_removed")
            if not weight.uses():
                graph.initializers.pop(weight.name)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _new_initializer(self, graph: ir.Graph, weight: ir.Value, array: np.ndarray) -> ir.Value:
        name = f"{weight.name}.T"
        while name in graph.initializers:
            name += "_"
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(weight.dtype),
            const_value=ir.tensor(array, dtype=weight.dtype, name=name),
        )
        graph.register_initializer(value)
        self.tag(value)
        return value
