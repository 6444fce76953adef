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

``post_norms`` and ``remove_norm`` are shared with ``absorb-post-norm``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import Linear, ModelMap, Norm
from pangu_light.passes.infra.base import PanguPass

__all__ = ["DropPostNormPass", "PostNorm", "post_norms", "remove_norm"]

_log = logging.getLogger(__name__)
POST_ROLES = ("post_attn", "post_ffn")


class PostNorm(NamedTuple):
    layer: int
    role: str  # "post_attn" | "post_ffn"
    norm: Norm
    source: Linear  # the projection that feeds it: o_proj or down_proj

    @property
    def where(self) -> str:
        return f"layer {self.layer} {self.role} norm {self.norm.module or self.norm.gamma.name}"


def post_norms(model_map: ModelMap) -> list[PostNorm]:
    """Every post-norm, in model-map order: layer by layer, post_attn then post_ffn."""
    found = []
    for layer in model_map.layers:
        for role, source in (("post_attn", layer.attention.o), ("post_ffn", layer.ffn.down)):
            norm = layer.norms.get(role)
            if norm is not None:
                found.append(PostNorm(layer.index, role, norm, source))
    return found


def check_removable(post: PostNorm, pass_name: str) -> None:
    """Refuse a norm whose output is a graph output (nothing could read its input instead)."""
    if post.norm.output.is_graph_output():
        raise PanguLightError(
            f"pass {pass_name}: {post.where}: its output {post.norm.output.name} is a graph output; "
            "remove that output first"
        )


def remove_norm(model: ir.Model, norm: Norm) -> tuple[int, list[ir.Node]]:
    """Let the readers of ``norm.output`` read ``norm.input``; delete the norm's nodes and the
    initializers only they read. Returns (nodes removed, the readers that were re-pointed)."""
    graph = model.graph
    readers = list(dict.fromkeys(use.node for use in norm.output.uses()))
    norm.output.replace_all_uses_with(norm.input)
    read = list(dict.fromkeys(v for node in norm.nodes for v in node.inputs if v is not None))
    graph.remove(norm.nodes, safe=True)
    for value in read:
        if value.is_initializer() and not value.uses() and not value.is_graph_input():
            graph.initializers.pop(value.name)
    return len(norm.nodes), readers


def remove_post_norm(pass_: PanguPass, model: ir.Model, post: PostNorm, counter: str) -> None:
    """Remove ``post``'s norm, tag the nodes that now read its input, count it under
    ``counter`` and the nodes removed under ``nodes_removed``."""
    removed, readers = remove_norm(model, post.norm)
    for node in readers:
        pass_.tag(node)
    pass_.count(counter)
    pass_.count("nodes_removed", removed)


def ensure_no_post_norms(pass_: PanguPass, model: ir.Model, counter: str) -> None:
    """After a pass that counted post-norms under ``counter``, none may be left."""
    if pass_.stats.get(counter):
        left = post_norms(ModelMap.from_model(model))
        if left:
            raise PanguLightError(f"pass {pass_.name}: {left[0].where} is still in the graph")


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
