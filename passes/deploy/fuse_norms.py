"""fuse-norms: every RMSNorm becomes SimplifiedLayerNormalization, and a residual Add feeding one
becomes SkipSimplifiedLayerNormalization (onnxscript's own ``ort_fusions`` rules, unchanged).

    x --Pow 2--ReduceMean--Add eps--Sqrt--Reciprocal--Mul x--Mul gamma-->   becomes
    SimplifiedLayerNormalization(x, gamma, epsilon=eps):  y = gamma * x / sqrt(mean(x^2) + eps)

    a, b --Add--> h --RMSNorm--> y     becomes     SkipSimplifiedLayerNormalization(a, b, gamma)
                  '--> (residual)                  -> y, (unused, unused,) h (input_skip_bias_sum)

The rules name every output of the fused node, so ONNX Runtime computes and stores the unused
mean and 1/std (outputs 1, 2) of every norm at every step; an optional output that nothing reads
is left unnamed instead (the ONNX convention for an absent optional output: the kernel skips it).

The rules match our export as it is (Reciprocal + Mul, gamma ``1 + w`` as its own Add for the
Gemma families: the rule's scale is whatever value is multiplied in), so nothing here is written
by hand. Per-head q/k norms (Qwen3, Gemma3) fuse too: the normalised axis is the last one.

The Skip rule checks that both addends have the same [B, S, D] by symbolic dim name. Pruning
passes leave values without shapes, and onnx's shape inference names what it cannot follow
through computed Reshapes ``unk__N``, differently on each side of a residual Add. So each Add
that feeds an RMSNorm (``Pow``) and adds two rank-3 values of one static width D is given the
graph's own names first: [batch, sequence, D] as ``input_ids`` [batch, sequence] declares them
(a residual of a decoder is one hidden vector per token). Only this check reads those names.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

from pangu_light.core import contract
from pangu_light.passes.infra.base import PanguPass

__all__ = ["FuseNormsPass"]


class FuseNormsPass(PanguPass):
    name = "fuse-norms"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count("residual_shapes_named", _name_residual_dims(model.graph))
        norms = rms_normalization.fuse_rms_normalization(model)
        skips = skip_normalization.fuse_skip_rms_normalization(model)
        self.count("simplified_layer_norms", norms - skips)
        self.count("skip_simplified_layer_norms", skips)
        for node in model.graph:
            if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
                self.tag(node)
                self.count("unused_outputs_dropped", _drop_unused_outputs(node))
        for value in list(model.graph.initializers.values()):  # the replaced nodes' constants
            if not value.uses() and not value.is_graph_output():
                model.graph.initializers.pop(value.name)
        if skips:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(norms or skips))


def _drop_unused_outputs(node: ir.Node) -> int:
    """Unname the optional outputs (all but the first) that nothing reads; returns how many."""
    dropped = 0
    for value in node.outputs[1:]:
        if value.name and not value.uses() and not value.is_graph_output():
            value.name = ""
            dropped += 1
    return dropped


def _name_residual_dims(graph: ir.Graph) -> int:
    """Give the addends and sum of each residual Add before an RMSNorm the dims [batch, sequence, D]."""
    ids = next((v for v in graph.inputs if v.name == contract.INPUT_IDS), None)
    if ids is None or ids.shape is None or len(ids.shape) != 2:
        return 0
    batch, sequence = ids.shape[0], ids.shape[1]
    named = 0
    for node in graph:
        if node.op_type != "Add" or not any(use.node.op_type == "Pow" for use in node.outputs[0].uses()):
            continue
        values = [*node.inputs, node.outputs[0]]
        shapes = [v.shape if v is not None else None for v in values]
        if any(s is None or len(s) != 3 or not isinstance(s[2], int) for s in shapes):
            continue
        if len({s[2] for s in shapes}) != 1:
            continue
        for value in values:
            value.shape = ir.Shape([batch, sequence, shapes[0][2]])
        named += 1
    return named
