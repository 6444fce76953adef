"""Post-norms (sandwich models) as a unit: finding them, and removing one from the graph.

A sandwich-norm layer adds ``RMSNorm_post(f(h))`` to the residual; the post-norm reads the
output of o_proj (``post_attn``) or down_proj (``post_ffn``). Removing it lets its readers read
its input instead and deletes its nodes and the initializers only they read::

    o_proj/down --> x --RMSNorm(post)--> y --Add-->    becomes    o_proj/down --> x --Add-->

Used by ``drop-post-norm`` (the plain removal) and ``absorb-post-norm`` (which first folds
the norm's calibrated scale into the projection).
"""

from __future__ import annotations

from typing import NamedTuple

import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import Linear, ModelMap, Norm
from pangu_light.passes.infra.base import PanguPass

__all__ = [
    "PostNorm",
    "post_norms",
    "check_removable",
    "remove_norm",
    "remove_post_norm",
    "ensure_no_post_norms",
]


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


def ensure_no_post_norms(pass_: PanguPass, model: ir.Model, counter: str, allowed: set[str] = frozenset()) -> None:
    """After a pass that counted post-norms under ``counter``, none may be left but the
    ``allowed`` ones (by gamma name)."""
    if pass_.stats.get(counter):
        left = [post for post in post_norms(ModelMap.from_model(model)) if post.norm.gamma.name not in allowed]
        if left:
            raise PanguLightError(f"pass {pass_.name}: {left[0].where} is still in the graph")
