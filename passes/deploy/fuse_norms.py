"""fuse-norms: every RMSNorm becomes SimplifiedLayerNormalization, and a residual Add feeding one
becomes SkipSimplifiedLayerNormalization (onnxscript's own ``ort_fusions`` rules, unchanged).

    x --Pow 2--ReduceMean--Add eps--Sqrt--Reciprocal--Mul x--Mul gamma-->   becomes
    SimplifiedLayerNormalization(x, gamma, epsilon=eps):  y = gamma * x / sqrt(mean(x^2) + eps)

    a, b --Add--> h --RMSNorm--> y     becomes     SkipSimplifiedLayerNormalization(a, b, gamma)
                  '--> (residual)                  -> y, (unused, unused,) h (input_skip_bias_sum)

The rules match our export as it is (Reciprocal + Mul, gamma ``1 + w`` as its own Add for the
Gemma families: the rule's scale is whatever value is multiplied in), so nothing here is written
by hand. Per-head q/k norms (Qwen3, Gemma3) fuse too: the normalised axis is the last one.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

from pangu_light.passes.infra.base import PanguPass

__all__ = ["FuseNormsPass"]


class FuseNormsPass(PanguPass):
    name = "fuse-norms"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        norms = rms_normalization.fuse_rms_normalization(model)
        skips = skip_normalization.fuse_skip_rms_normalization(model)
        self.count("simplified_layer_norms", norms - skips)
        self.count("skip_simplified_layer_norms", skips)
        for node in model.graph:
            if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
                self.tag(node)
        if skips:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(norms or skips))
