"""pack-qkv: the q, k and v projections that feed a GroupQueryAttention become one MatMul whose
output GQA reads as packed QKV (its ``query`` input, ``key`` and ``value`` left empty).

    x --MatMul Wq [+ bq]--> q --.                    x --MatMul [Wq | Wk | Wv] [+ [bq | bk | bv]]--> qkv --GQA
    x --MatMul Wk [+ bk]--> k --+-- GQA      becomes
    x --MatMul Wv [+ bv]--> v --'

Column blocks of one product are the separate products: x [Wq | Wk | Wv] = [x Wq | x Wk | x Wv],
so the function is unchanged (each output element is the same dot product; only the kernel that
computes it differs). GQA splits the packed width as heads * d + 2 * kv_heads * d. One GEMV of
the summed width reads the same weights with one call instead of three, which is what pays in
decode. Run after ``fold-weight-transpose`` (weights [in, out] initializers). Skipped where
something sits between a projection and GQA (Qwen3/Gemma3's q/k norms), where a weight is read
elsewhere, or where the three do not read one input.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pangu_light.passes.infra.base import PanguPass

__all__ = ["PackQKVPass"]


class PackQKVPass(PanguPass):
    name = "pack-qkv"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
                continue
            projections = [_projection(v) for v in node.inputs[:3]]
            if any(p is None for p in projections) or len({p[0].inputs[0] for p in projections}) != 1:
                self.count("skipped")
                continue
            self._pack(graph, node, projections)
            self.count("packed")
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _pack(self, graph: ir.Graph, gqa: ir.Node, projections) -> None:
        x = projections[0][0].inputs[0]
        weights = [p[0].inputs[1].const_value.numpy() for p in projections]
        prefix = gqa.name or "gqa"
        packed = _initializer(graph, f"{prefix}.qkv_weight", np.concatenate(weights, axis=1))
        matmul = ir.node("MatMul", [x, packed], name=f"{prefix}.qkv_proj")
        output = matmul.outputs[0]
        new_nodes = [matmul]
        biases = [p[1] for p in projections]
        if any(b is not None for b in biases):
            arrays = [
                b.inputs[1].const_value.numpy() if b is not None else np.zeros(w.shape[1], w.dtype)
                for b, w in zip(biases, weights)
            ]
            bias = _initializer(graph, f"{prefix}.qkv_bias", np.concatenate(arrays))
            add = ir.node("Add", [output, bias], name=f"{prefix}.qkv_bias_add")
            new_nodes.append(add)
            output = add.outputs[0]
        width = sum(w.shape[1] for w in weights)
        if x.shape is not None and len(x.shape) == 3:
            output.shape = ir.Shape([x.shape[0], x.shape[1], width])
        output.dtype = x.dtype
        graph.insert_before(gqa, new_nodes)
        for node in new_nodes:
            self.tag(node)
        gqa.replace_input_with(0, output)
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        for matmul_node, add_node in projections:
            for dead in (add_node, matmul_node):
                if dead is not None and not any(v.uses() for v in dead.outputs):
                    weight = dead.inputs[1]
                    graph.remove(dead, safe=True)
                    if weight.is_initializer() and not weight.uses():
                        graph.initializers.pop(weight.name)


def _projection(value: ir.Value | None):
    """(MatMul, bias Add or None) producing ``value`` from a constant [in, out] weight, read
    nowhere else; else None."""
    if value is None or len(value.uses()) != 1:
        return None
    node = value.producer()
    add = None
    if node is not None and node.op_type == "Add":
        bias = next((v for v in node.inputs if v is not None and v.const_value is not None), None)
        other = next((v for v in node.inputs if v is not bias), None)
        if bias is None or other is None or len(other.uses()) != 1 or len(bias.shape or ()) != 1:
            return None
        add, node = node, other.producer()
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.shape or ()) != 2 or len(weight.uses()) != 1:
        return None
    return node, add


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=name))
    graph.register_initializer(value)
    return value
