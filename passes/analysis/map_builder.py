"""Deriving a model map from a graph: regions by pattern, grouped into layers by module scope.

Every norm and projection of the graph is found by its pattern (``patterns.RMS_NORM``,
``patterns.LINEAR``); the ``...layers.N`` module scope groups them into layers; inside a layer,
roles come from position (which projections share an input, what feeds what), and the
attention is read by ``map_attention``. Every failure names what was not found.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.passes.analysis import patterns
from pangu_light.passes.analysis.graph_utils import common_prefix, module_scopes, walk_back
from pangu_light.passes.analysis.map_attention import build_attention
from pangu_light.passes.analysis.map_types import (
    NORM_ROLES,
    Attention,
    FeedForward,
    Layer,
    Linear,
    Norm,
    not_understood,
)

__all__ = ["build_parts", "find_linears", "find_norms"]

_ELEMENTWISE = frozenset({"Div", "Tanh", "Mul", "Cast"})
_LAYER_SCOPE = re.compile(r"^(?P<stack>.+)\.(?P<index>\d+)$")


def build_parts(model: ir.Model) -> dict[str, Any]:
    """The fields of a ``ModelMap`` of ``model``."""
    return _MapBuilder(model).build()


def find_linears(graph: ir.Graph) -> list[Linear]:
    found = []
    for node in graph:
        if node.op_type != "MatMul":
            continue
        m = patterns.match(patterns.LINEAR, node.outputs[0])
        if m is None:
            continue
        out = node.outputs[0]
        bias = bias_add = None
        consumers = out.consumers()
        if len(consumers) == 1 and consumers[0].op_type == "Add":
            with_bias = patterns.match(patterns.LINEAR_BIAS, consumers[0].outputs[0], {"y": out})
            if with_bias is not None:
                bias_add, bias = with_bias["bias_add"], with_bias["bias"]
                out = bias_add.outputs[0]
        scopes = module_scopes(node)
        found.append(Linear(
            module=scopes[-1] if scopes else "", weight=m["w"], matmul=node, transpose=m["transpose"],
            bias=bias, bias_add=bias_add, input=m["x"], output=out,
        ))
    return found


def find_norms(graph: ir.Graph) -> list[Norm]:
    found = []
    cast_back: set[ir.Node] = set()  # gamma Muls of half-graph norms that end in a Cast
    for node in graph:
        if node.op_type not in ("Mul", "Cast"):
            continue
        m = patterns.match(patterns.RMS_NORM, node.outputs[0])
        if m is None:
            continue
        if m.get("output_cast") is not None:
            cast_back.add(m["gamma_mul"])
        # gamma_mul last: its module scope is the norm's (the exporter may leave a Cast without one)
        names = ("upcast", "pow", "mean", "add_eps", "sqrt", "reciprocal", "scale", "downcast",
                 "gamma_upcast", "add_one", "output_cast", "gamma_mul")
        scopes = module_scopes(m["gamma_mul"])
        eps = patterns.scalar(m["eps"])
        found.append(Norm(
            role="", module=scopes[-1] if scopes else "", gamma=m["w"], one_plus_w=m.get("add_one") is not None,
            input=m["x"], output=node.outputs[0], eps=0.0 if eps is None else eps,
            nodes=[m[name] for name in names if m.get(name) is not None],
        ))
    return [n for n in found if n.output.producer() not in cast_back]


class _MapBuilder:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self._upstream: dict[ir.Value, set[ir.Value]] = {}
        self.layer_nodes: dict[str, list[ir.Node]] = defaultdict(list)
        for node in self.graph:
            for scope in module_scopes(node):
                if _LAYER_SCOPE.match(scope):
                    self.layer_nodes[scope].append(node)

    def upstream(self, value: ir.Value) -> set[ir.Value]:
        """Every value ``value`` depends on (memoised: several roles ask about one input)."""
        if value not in self._upstream:
            self._upstream[value] = set(walk_back([value]))
        return self._upstream[value]

    def build(self) -> dict[str, Any]:
        graph = self.graph
        inputs = {v.name: v for v in graph.inputs}
        if contract.INPUT_IDS not in inputs or not graph.outputs or graph.outputs[0].name != contract.LOGITS:
            raise not_understood("expected an input 'input_ids' and a first output 'logits'")
        readers = inputs[contract.INPUT_IDS].consumers()
        gathers = [n for n in readers if n.op_type == "Gather" and patterns.is_weight(n.inputs[0])]
        if len(gathers) != 1:
            raise not_understood("no embedding lookup (Gather of a weight by input_ids)")
        gather = gathers[0]
        embedding = gather.inputs[0]
        linears = find_linears(graph)
        logits_source = graph.outputs[0]
        # Gemma2 soft-caps the logits (Div, Tanh, Mul by constants) after the lm_head.
        while logits_source.producer() is not None and logits_source.producer().op_type in _ELEMENTWISE:
            logits_source = logits_source.producer().inputs[0]
        lm_heads = [lin for lin in linears if lin.output is logits_source]
        if len(lm_heads) != 1:
            raise not_understood("the logits are not produced by a MatMul with a weight (lm_head)")
        lm_head = lm_heads[0]
        norms = find_norms(graph)
        norm_by_output = {n.output: n for n in norms}
        final_norms = [n for n in norms if n.output is lm_head.input]
        if len(final_norms) != 1:
            raise not_understood("no RMSNorm directly before the lm_head")
        final_norm = final_norms[0]
        final_norm.role = "final"

        # Group linears and norms into layers by their module path (the ``...layers.N`` scope).
        layer_of: dict[int, str] = {}
        grouped_linears: dict[int, list[Linear]] = defaultdict(list)
        grouped_norms: dict[int, list[Norm]] = defaultdict(list)
        for item, bucket in [(lin, grouped_linears) for lin in linears if lin is not lm_head] + [
            (n, grouped_norms) for n in norms if n is not final_norm
        ]:
            index, scope = _layer_index(item.matmul if isinstance(item, Linear) else item.nodes[-1])
            if index is None:
                raise not_understood(f"{item.module or 'a node'} is outside any decoder layer")
            layer_of[index] = scope
            bucket[index].append(item)
        if not layer_of:
            raise not_understood("no decoder layers found")
        indices = sorted(layer_of)
        if indices != list(range(len(indices))):
            raise not_understood(f"decoder layers are not numbered 0..n-1 (found {indices})")

        layers = [
            self.build_layer(i, layer_of[i], grouped_linears[i], grouped_norms[i], norm_by_output)
            for i in indices
        ]
        for previous, layer in zip(layers, layers[1:]):
            if layer.input is not previous.output:
                raise not_understood(f"layer {layer.index} does not read layer {previous.index}'s output")
        if final_norm.input is not layers[-1].output:
            raise not_understood("the final norm does not read the last layer's output")

        return dict(
            family=self.model.metadata_props.get(contract.FAMILY),
            graph_kind="decode" if any(contract.is_past_input(v.name) for v in graph.inputs) else "no-cache",
            hidden_size=int(embedding.shape[1]),
            vocab_size=int(embedding.shape[0]),
            embedding=embedding,
            embedding_gather=gather,
            lm_head=lm_head,
            tied_embeddings=lm_head.weight is embedding,
            final_norm=final_norm,
            layers=layers,
        )

    def build_layer(self, index, scope, linears, norms, norm_by_output) -> Layer:
        where = f"layer {index} ({scope})"
        norms_by_input: dict[ir.Value, list[Norm]] = defaultdict(list)
        for n in norms:
            norms_by_input[n.input].append(n)
        by_input: dict[ir.Value, list[Linear]] = defaultdict(list)
        for lin in linears:
            by_input[lin.input].append(lin)

        # The attention projections are the three linears sharing one normalised input.
        qkv_candidates = [group for group in by_input.values() if len(group) == 3]
        if len(qkv_candidates) != 1:
            raise not_understood(f"{where}: no q/k/v projections reading one normalised input")
        qkv = qkv_candidates[0]
        pre_attn = norm_by_output.get(qkv[0].input)
        if pre_attn is None or pre_attn not in norms:
            raise not_understood(f"{where}: q/k/v do not read an RMSNorm of this layer")
        pre_attn.role = "pre_attn"

        attention = build_attention(where, scope, self.layer_nodes[scope], self.upstream, qkv, linears, norms)
        ffn = self.build_ffn(where, linears, attention)
        layer_norms = {"pre_attn": pre_attn}
        pre_ffn = norm_by_output.get(ffn.gate.input)
        if pre_ffn is None or pre_ffn not in norms:
            raise not_understood(f"{where}: gate/up do not read an RMSNorm of this layer")
        pre_ffn.role = "pre_ffn"
        for post_role, source in (("post_attn", attention.o), ("post_ffn", ffn.down)):
            posts = norms_by_input.get(source.output, [])
            if len(posts) == 1:
                posts[0].role = post_role
                layer_norms[post_role] = posts[0]
        layer_norms["pre_ffn"] = pre_ffn
        layer_norms = {r: layer_norms[r] for r in NORM_ROLES if r in layer_norms}
        unassigned = [n.module for n in norms if not n.role]
        if unassigned:
            raise not_understood(f"{where}: RMSNorm(s) with no recognised role: {unassigned}")

        # Residual stream: the layer input feeds the pre-attention norm; the layer output is
        # the Add of (mid residual, FFN branch).
        layer_input = pre_attn.input
        attn_branch = layer_norms.get("post_attn", None)
        attn_out = attn_branch.output if attn_branch else attention.o.output
        add1 = _add_joining(attn_out, layer_input)
        if add1 is None:
            raise not_understood(f"{where}: no residual Add after the attention block")
        mid = add1.outputs[0]
        if pre_ffn.input is not mid:
            raise not_understood(f"{where}: the pre-FFN norm does not read the attention residual")
        ffn_branch = layer_norms.get("post_ffn", None)
        ffn_out = ffn_branch.output if ffn_branch else ffn.down.output
        add2 = _add_joining(ffn_out, mid)
        if add2 is None:
            raise not_understood(f"{where}: no residual Add after the FFN block")
        return Layer(
            index=index, module=scope, input=layer_input, output=add2.outputs[0],
            norms=layer_norms, attention=attention, ffn=ffn, residual_adds=[add1, add2],
        )

    def build_ffn(self, where, linears: list[Linear], attention: Attention) -> FeedForward:
        used = {id(attention.q), id(attention.k), id(attention.v), id(attention.o)}
        rest = [lin for lin in linears if id(lin) not in used]
        down_candidates = []
        for lin in rest:
            upstream = self.upstream(lin.input)
            feeders = [other for other in rest if other is not lin and other.output in upstream]
            if feeders:
                down_candidates.append((lin, feeders))
        if len(down_candidates) != 1:
            raise not_understood(f"{where}: cannot identify the FFN down projection")
        down, feeders = down_candidates[0]
        if len(feeders) == 1:
            fused = feeders[0]
            return FeedForward(
                module=common_prefix(fused.module, down.module), gate=fused, up=fused, down=down,
                fused_gate_up=True, intermediate_size=down.in_features,
            )
        if len(feeders) != 2:
            raise not_understood(f"{where}: expected gate and up projections before down_proj")
        product = down.input.producer()
        # up feeds the product directly; gate goes through the activation first.
        direct = [lin for lin in feeders if product is not None and lin.output in product.inputs]
        if product is None or len(direct) != 1:
            raise not_understood(f"{where}: cannot tell gate_proj from up_proj")
        up = direct[0]
        gate = feeders[0] if feeders[1] is up else feeders[1]
        return FeedForward(
            module=common_prefix(gate.module, down.module), gate=gate, up=up, down=down,
            fused_gate_up=False, intermediate_size=down.in_features,
        )


def _layer_index(node: ir.Node) -> tuple[int | None, str]:
    for scope in reversed(module_scopes(node)):
        match = _LAYER_SCOPE.match(scope)
        if match:
            return int(match.group("index")), scope
    return None, ""


def _add_joining(branch: ir.Value, residual: ir.Value) -> ir.Node | None:
    for node in branch.consumers():
        if node.op_type == "Add" and residual in node.inputs:
            return node
    return None
