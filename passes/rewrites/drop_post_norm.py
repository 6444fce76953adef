"""drop-post-norm: remove the post-attention and post-FFN RMSNorms, without compensation.

The paper's "Direct Prune" comparison for section 3.3: a sandwich-norm layer computes
``h + RMSNorm_post(f(h))``; this pass makes it ``h + f(h)``, i.e. the norm becomes the
identity (no s_inv, no gamma; ``absorb-post-norm`` is the compensated version)::

    o_proj/down --> x --RMSNorm(post)--> y --Add--> residual    becomes    o_proj/down --> x --Add--> residual
                          ^ gamma

The norm is found through the model map (roles ``post_attn``/``post_ffn``, whatever the
module is called: Gemma2/3 ``post_attention_layernorm``/``post_feedforward_layernorm``,
GLM4 ``post_self_attn_layernorm``/``post_mlp_layernorm``). Its nodes (Pow, ReduceMean,
Add(eps), Sqrt, Reciprocal, Mul, Mul(gamma), and Add(w, 1) for Gemma's 1 + w) and the
constants only they read (gamma, exponent, axes) are deleted.
The removal itself is ``passes.surgery.post_norm`` (shared with ``absorb-post-norm``).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.base import PanguPass
from pangu_light.passes.surgery.post_norm import (
    check_removable,
    ensure_no_post_norms,
    post_norms,
    remove_post_norm,
)

__all__ = ["DropPostNormPass"]

_log = logging.getLogger(__name__)


class DropPostNormPass(PanguPass):
    name = "drop-post-norm"
    options_schema = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        posts = post_norms(ModelMap.from_model(model))
        if not posts:
            self.stats["post_norms_removed"] = 0
            self.stats["note"] = "no post-norms to remove"
            _log.info("pass %s: no post-norms to remove (a pre-norm-only model); nothing changed", self.name)
            return ir.passes.PassResult(model, modified=False)
        for post in posts:
            check_removable(post, self.name)
        for post in posts:
            remove_post_norm(self, model, post, "post_norms_removed")
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        ensure_no_post_norms(self, model, "post_norms_removed")
