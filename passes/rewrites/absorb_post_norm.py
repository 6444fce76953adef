"""absorb-post-norm: replace each post-RMSNorm by a constant scale folded into its projection.

Paper section 3.3, for sandwich-norm models. A post-norm computes
``y = gamma_eff * x / sqrt(mean(x^2) + eps)`` (gamma_eff = w, or 1 + w for Gemma). Over the
calibration tokens its inverse RMS is replaced by a constant::

    s_inv     = mean_tokens 1 / sqrt(mean(x^2) + eps)          (eq. 8, from calibration)
    gamma_abs = s_inv * gamma_eff                              (eq. 9)
    y         = gamma_abs * x,   x = W z + b                   (eq. 10)
              = (diag(gamma_abs) W) z + gamma_abs * b

so the norm disappears and ``W[out, in]`` (o_proj or down_proj, read through a Transpose)
has its output row k, and its bias entry k, multiplied by gamma_abs[k]::

    x --RMSNorm(post)--> y --Add--> residual        becomes        x --Add--> residual
          ^ gamma                                                  (o_proj rows * gamma_abs)

Post-norms are found through the model map (roles ``post_attn``/``post_ffn``, whatever their
names). s_inv comes from the options (``s_inv=[...]``, one per post-norm in model-map order:
layer by layer, post_attn then post_ffn) or from the plan recorded in the graph
(``plan=true``: ``PrunePlan.post_norm_s_inv``, keyed by the norm's gamma initializer name).
``keep`` (or the plan's ``post_norms.keep``) names post-norms, by gamma, that stay real norms:
one constant is a poor stand-in for 1/rms where it varies a lot over tokens (Gemma-3's deeper
post-FFN norms; see calib/stats.py ``s_inv_spread``), and absorbing those breaks the model.
Weights are scaled in float64 and cast back once. Every fold is checked before anything is
edited: a weight, bias or projection output that something else also reads is refused.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import exclusive, module_scopes, outside_readers, replace_initializer
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.base import Option, PanguPass
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.post_norm import (
    PostNorm,
    check_removable,
    ensure_no_post_norms,
    post_norms,
    remove_post_norm,
)

__all__ = ["AbsorbPostNormPass"]

_log = logging.getLogger(__name__)


class AbsorbPostNormPass(PanguPass):
    name = "absorb-post-norm"
    options_schema = {
        "s_inv": Option(
            list[float], default=None,
            doc="mean inverse RMS of each post-norm's input, in model-map order "
            "(layer by layer, post_attn then post_ffn)",
        ),
        "plan": Option(bool, default=False, doc="read s_inv (and the norms to keep) from the plan in the graph"),
        "keep": Option(list[str], default=None, doc="gamma names of post-norms to leave as real norms"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if (self.options["s_inv"] is None) == (not self.options["plan"]):
            raise PanguLightError(
                f"pass {self.name}: give exactly one of s_inv=[...] (one value per post-norm) or plan=true"
            )
        model_map = ModelMap.from_model(model)
        posts = post_norms(model_map)
        if not posts:
            self.stats["post_norms_absorbed"] = 0
            self.stats["note"] = "no post-norms to absorb"
            _log.info("pass %s: no post-norms to absorb (a pre-norm-only model); nothing changed", self.name)
            return ir.passes.PassResult(model, modified=False)
        scales = self._s_inv(model, model_map, posts)
        keep = self._kept(model, posts)
        chosen = [(post, s_inv) for post, s_inv in zip(posts, scales) if post.norm.gamma.name not in keep]
        self.stats["post_norms_kept"] = len(posts) - len(chosen)
        # Check every fold first, so that a refusal leaves the graph untouched.
        for post, s_inv in chosen:
            check_removable(post, self.name)
            self._check_exclusive(post)
            if not (math.isfinite(s_inv) and s_inv > 0):
                raise PanguLightError(
                    f"pass {self.name}: {post.where}: s_inv={s_inv} must be a positive finite number "
                    "(a mean inverse RMS); recompute it with `pangu-light calibrate`"
                )
        for post, s_inv in chosen:
            gamma_abs = s_inv * post.norm.effective_gamma()  # float64
            source = post.source
            weight = source.weight.const_value.numpy().astype(np.float64)
            replace_initializer(source.weight, weight * gamma_abs[:, None])
            self.tag(source.weight)
            self.count("weights_scaled")
            if source.bias is not None:
                bias = source.bias.const_value.numpy().astype(np.float64)
                replace_initializer(source.bias, bias * gamma_abs)
                self.tag(source.bias)
                self.count("weights_scaled")
            remove_post_norm(self, model, post, "post_norms_absorbed")
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        ensure_no_post_norms(self, model, "post_norms_absorbed", allowed=getattr(self, "_keep_names", set()))

    def _kept(self, model: ir.Model, posts: list[PostNorm]) -> set[str]:
        names = self.options["keep"]
        if names is None and self.options["plan"]:
            names = PrunePlan.from_model(model, self.name).post_norm_keep
        names = set(names or ())
        unknown = sorted(names - {post.norm.gamma.name for post in posts})
        if unknown:
            raise PanguLightError(
                f"pass {self.name}: keep names {unknown[0]}, which is not the gamma of a post-norm in this graph; "
                "give post-norm gamma names as `pangu-light inspect` lists them"
            )
        self._keep_names = names
        return names

    # -- s_inv -----------------------------------------------------------------------------

    def _s_inv(self, model: ir.Model, model_map: ModelMap, posts: list[PostNorm]) -> list[float]:
        listed = self.options["s_inv"]
        if listed is not None:
            if len(listed) != len(posts):
                order = ", ".join(f"{p.layer}.{p.role}" for p in posts[:4])
                raise PanguLightError(
                    f"pass {self.name}: s_inv has {len(listed)} values but the graph has {len(posts)} "
                    f"post-norms; give one per post-norm, layer by layer, post_attn then post_ffn "
                    f"({order}{', ...' if len(posts) > 4 else ''})"
                )
            return list(listed)
        plan = PrunePlan.from_model(model, self.name)
        if len(model_map.layers) != len(plan.shapes):
            raise PanguLightError(
                f"pass {self.name}: the plan is for {len(plan.shapes)} layers but the graph has "
                f"{len(model_map.layers)}; apply the plan to the graph it was made for, with drop-layers last"
            )
        table = plan.post_norm_s_inv
        names = [p.norm.gamma.name for p in posts]
        missing = [name for name in names if name not in table]
        if missing:
            raise PanguLightError(
                f"pass {self.name}: the plan has no s_inv for {missing[0]}"
                f"{f' (and {len(missing) - 1} more post-norms)' if len(missing) > 1 else ''}; "
                "make the plan from calibration statistics of this model "
                "(`pangu-light calibrate`, then `pangu-light plan`)"
            )
        extra = sorted(set(table) - set(names))
        if extra:
            raise PanguLightError(
                f"pass {self.name}: the plan gives s_inv for {extra[0]}, which is not a post-norm gamma of "
                "this graph; the plan is for another model"
            )
        return [table[name] for name in names]

    # -- safety ----------------------------------------------------------------------------

    def _check_exclusive(self, post: PostNorm) -> None:
        """Refuse to fold into a weight, bias or projection output that others also read."""
        source = post.source
        where = f"pass {self.name}: {post.where}: cannot fold gamma_abs into {source.module or 'its projection'}"
        for value, region in ((source.weight, [source.transpose]), (source.transpose.outputs[0], [source.matmul])):
            if not exclusive(value, region):
                others = ", ".join(_describe(n) for n in outside_readers(value, region)) or "the graph's inputs/outputs"
                raise PanguLightError(
                    f"{where}: the weight {source.weight.name} is also read by {others}; scaling it would "
                    "change them too. Give this projection its own copy of the weight, or use drop-post-norm"
                )
        if source.bias is not None and not exclusive(source.bias, [source.bias_add]):
            readers = outside_readers(source.bias, [source.bias_add])
            raise PanguLightError(
                f"{where}: the bias {source.bias.name} is also read by "
                f"{', '.join(_describe(n) for n in readers) or 'a graph input'}; give it its own copy"
            )
        if not exclusive(source.output, post.norm.nodes):
            readers = outside_readers(source.output, post.norm.nodes)
            raise PanguLightError(
                f"{where}: its output {source.output.name} is also read by "
                f"{', '.join(_describe(n) for n in readers) or 'a graph output'}, which would see the scaled values"
            )


def _describe(node: ir.Node) -> str:
    scopes = module_scopes(node)
    return f"{node.op_type} {node.name or '?'}" + (f" in {scopes[-1]}" if scopes else "")
