"""slnp: Stabilized LayerNorm Pruning, rescale the gammas that lost channels (paper eq. 6).

Slicing the hidden size to K channels leaves each RMSNorm gamma with a smaller L2 norm, so
the sum the next layer reads shrinks. SLNP restores each such gamma's original norm::

    gamma_new = gamma_pruned * ||gamma_orig||_2 / ||gamma_pruned||_2                   (eq. 6)

applied to the effective gamma: for Gemma's ``(1 + w)`` norms, g = 1 + w is rescaled and
``w_new = g_new - 1``. Only the gamma initializer changes::

    x -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) -> Mul(gamma_new)
                                                          (Gemma: Mul(Add(w_new, 1)))

||gamma_orig|| comes from the graph itself: slice-hidden records it on every gamma it slices
(``contract.GAMMA_L2_BEFORE_SLICE``). This pass rescales exactly those, in float64, cast
back once, and marks each one (``contract.SLNP_APPLIED``) so running it twice does not
rescale twice. With nothing sliced it changes nothing. To turn SLNP off, leave it out of the
pipeline (``PrunePlan.pipeline(slnp=False)``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import replace_initializer
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.base import PanguPass

__all__ = ["SLNPPass"]


class SLNPPass(PanguPass):
    name = "slnp"
    options_schema = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = ModelMap.from_model(model)
        todo = []
        for norm in model_map.hidden_norms():
            props = norm.gamma.metadata_props
            if contract.GAMMA_L2_BEFORE_SLICE not in props or contract.SLNP_APPLIED in props:
                continue
            if any(norm.gamma is other.gamma for other in todo):
                continue
            todo.append(norm)
        if not todo:
            return ir.passes.PassResult(model, modified=False)
        scales = []
        for norm in todo:
            gamma = norm.effective_gamma()  # float64
            original = _recorded_norm(norm)
            pruned = float(np.linalg.norm(gamma))
            if pruned == 0.0:
                raise PanguLightError(
                    f"pass slnp: {norm.gamma.name} ({norm.module}) is all zero after slicing; "
                    "it cannot be rescaled to its original norm (keep other channels)"
                )
            scale = original / pruned
            rescaled = gamma * scale
            replace_initializer(norm.gamma, rescaled - 1.0 if norm.one_plus_w else rescaled)
            norm.gamma.metadata_props[contract.SLNP_APPLIED] = repr(scale)
            self.tag(norm.gamma)
            self.count("gammas_rescaled")
            scales.append(scale)
        self.stats["scale_min"] = round(min(scales), 6)
        self.stats["scale_max"] = round(max(scales), 6)
        return ir.passes.PassResult(model, modified=True)


def _recorded_norm(norm) -> float:
    text = norm.gamma.metadata_props[contract.GAMMA_L2_BEFORE_SLICE]
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value < 0:
        raise PanguLightError(
            f"pass slnp: {norm.gamma.name} records {contract.GAMMA_L2_BEFORE_SLICE}={text!r}, not a norm; "
            "re-run slice-hidden on the unsliced graph"
        )
    return value
