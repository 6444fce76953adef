"""The model map: what every part of an exported decoder graph *is*, derived from the graph.

Passes never match tensor names typed by hand. They ask the map, which is rebuilt from the
graph itself on every call: graph position (what feeds what) plus the module paths that the
torch exporter records in ``metadata_props["pkg.torch.onnx.name_scopes"]``. The module
paths only group nodes into layers and modules; *roles* come from position, so GLM4's
``post_attention_layernorm`` (which is its pre-FFN norm) is found as pre-FFN.

One layer as the map sees it (sandwich norms dashed; Llama-style models have only the
pre-norms)::

    input --+--> [pre_attn] -> q,k,v -> ([q_norm],[k_norm], rope) -> attn -> o -> [post_attn] --Add--> h
            `---------------------------------------------------------------------------------^
    h ------+--> [pre_ffn] -> gate,up -> act(gate)*up -> down -> [post_ffn] --Add--> output
            `-------------------------------------------------------------------^

RMSNorm matched: ``x -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .)
-> Mul(gamma)``, where gamma is an initializer (``w``) or ``Add(w, 1)`` (``1 + w``, Gemma).
A linear layer is ``MatMul(x, Transpose(W[out, in]))`` with an optional ``Add(bias)``.
Head counts: GQA's ``Expand(Unsqueeze(kv), Concat[b, n_kv, n_rep, t, d])`` and the
``Reshape(Concat[b, n_heads, t, d])`` after it hold the only copies (q/k/v reshapes use -1).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from typing import Any

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_utils import constant_array, module_scopes, walk_back

__all__ = [
    "Norm",
    "Linear",
    "HeadCountConstant",
    "Attention",
    "FeedForward",
    "Layer",
    "ModelMap",
    "NORM_ROLES",
]

NORM_ROLES = ("pre_attn", "post_attn", "pre_ffn", "post_ffn", "q_norm", "k_norm", "final")
_ELEMENTWISE = frozenset({"Div", "Tanh", "Mul", "Cast"})
_LAYER_SCOPE = re.compile(r"^(?P<stack>.+)\.(?P<index>\d+)$")


# eq=False: parts of the map are compared by identity (``x in layer_linears``), never by value.
@dataclasses.dataclass(eq=False)
class Norm:
    role: str
    module: str
    gamma: ir.Value  # the initializer w (effective gamma is 1 + w when one_plus_w)
    one_plus_w: bool
    input: ir.Value  # x, the value normalised
    output: ir.Value  # gamma * x / rms(x)
    eps: float
    nodes: list[ir.Node]

    def effective_gamma(self) -> np.ndarray:
        w = self.gamma.const_value.numpy().astype(np.float64)
        return 1.0 + w if self.one_plus_w else w


@dataclasses.dataclass(eq=False)
class Linear:
    module: str
    weight: ir.Value  # initializer [out, in]
    matmul: ir.Node
    transpose: ir.Node | None
    bias: ir.Value | None
    bias_add: ir.Node | None
    input: ir.Value
    output: ir.Value  # after the bias Add when there is one

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


@dataclasses.dataclass
class HeadCountConstant:
    """One shape constant that encodes a head count: ``concat.inputs[index]`` holds ``what``."""

    concat: ir.Node
    index: int
    what: str  # "kv_heads" | "heads_per_group" | "heads"

    @property
    def value(self) -> ir.Value:
        return self.concat.inputs[self.index]


@dataclasses.dataclass
class Attention:
    module: str
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_count_constants: list[HeadCountConstant]
    q_norm: Norm | None
    k_norm: Norm | None
    context: ir.Value  # attention output before o_proj, [b, s, heads * head_dim]
    past_key: ir.Value | None
    past_value: ir.Value | None
    present_key: ir.Value | None
    present_value: ir.Value | None


@dataclasses.dataclass
class FeedForward:
    module: str
    gate: Linear  # for a fused gate_up projection, gate is up is the fused Linear
    up: Linear
    down: Linear
    fused_gate_up: bool
    intermediate_size: int


@dataclasses.dataclass
class Layer:
    index: int
    module: str
    input: ir.Value
    output: ir.Value
    norms: dict[str, Norm]
    attention: Attention
    ffn: FeedForward
    residual_adds: list[ir.Node]


@dataclasses.dataclass
class ModelMap:
    family: str | None
    graph_kind: str
    hidden_size: int
    vocab_size: int
    embedding: ir.Value
    embedding_gather: ir.Node
    lm_head: Linear
    tied_embeddings: bool
    final_norm: Norm
    layers: list[Layer]

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: ir.Model) -> ModelMap:
        return _MapBuilder(model).build()

    # ----------------------------------------------------------------- queries
    def all_norms(self) -> list[Norm]:
        norms = [n for layer in self.layers for n in layer.norms.values()]
        for layer in self.layers:
            norms.extend(n for n in (layer.attention.q_norm, layer.attention.k_norm) if n)
        return norms + [self.final_norm]

    def hidden_norms(self) -> list[Norm]:
        """Norms over the hidden dimension (all but q/k norms, which act on head_dim)."""
        return [n for n in self.all_norms() if n.role not in ("q_norm", "k_norm")]

    def layer(self, index: int) -> Layer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise PanguLightError(
            f"layer {index} does not exist; this model has layers 0..{len(self.layers) - 1}"
        )

    # ----------------------------------------------------------------- reporting
    def to_json(self) -> dict[str, Any]:
        def norm(n: Norm | None):
            if n is None:
                return None
            return {
                "role": n.role, "module": n.module, "gamma": n.gamma.name,
                "parametrization": "1+w" if n.one_plus_w else "w", "eps": n.eps,
                "input": n.input.name, "output": n.output.name,
            }

        def linear(lin: Linear):
            return {
                "module": lin.module, "weight": lin.weight.name,
                "bias": lin.bias.name if lin.bias is not None else None,
                "shape": [lin.out_features, lin.in_features],
            }

        layers = []
        for layer in self.layers:
            attn, ffn = layer.attention, layer.ffn
            layers.append({
                "index": layer.index, "module": layer.module,
                "input": layer.input.name, "output": layer.output.name,
                "norms": {role: norm(n) for role, n in layer.norms.items()},
                "attention": {
                    "q": linear(attn.q), "k": linear(attn.k), "v": linear(attn.v), "o": linear(attn.o),
                    "num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads,
                    "head_dim": attn.head_dim,
                    "q_norm": norm(attn.q_norm), "k_norm": norm(attn.k_norm),
                    "head_count_constants": [
                        {"node": c.concat.name, "input": c.index, "value_name": c.value.name,
                         "holds": c.what, "value": int(constant_array(c.value).reshape(-1)[0])}
                        for c in attn.head_count_constants
                    ],
                    "context": attn.context.name,
                    "kv_cache": None if attn.past_key is None else {
                        "past_key": attn.past_key.name, "past_value": attn.past_value.name,
                        "present_key": attn.present_key.name, "present_value": attn.present_value.name,
                    },
                },
                "ffn": {
                    "gate": linear(ffn.gate), "up": linear(ffn.up), "down": linear(ffn.down),
                    "fused_gate_up": ffn.fused_gate_up, "intermediate_size": ffn.intermediate_size,
                },
            })
        return {
            "family": self.family, "graph_kind": self.graph_kind,
            "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
            "num_layers": len(self.layers),
            "embedding": self.embedding.name, "lm_head": linear(self.lm_head),
            "tied_embeddings": self.tied_embeddings, "final_norm": norm(self.final_norm),
            "layers": layers,
        }

    def summary(self) -> str:
        lines = [
            f"family {self.family or '?'}, {self.graph_kind} graph, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}, {len(self.layers)} layers, "
            f"embeddings {'tied' if self.tied_embeddings else 'untied'}",
            f"{'layer':>5} {'heads':>5} {'kv':>3} {'hd':>4} {'ffn':>6}  norms",
        ]
        for layer in self.layers:
            attn = layer.attention
            norms = [f"{r}({'1+w' if n.one_plus_w else 'w'})" for r, n in layer.norms.items()]
            norms += [f"{n.role}" for n in (attn.q_norm, attn.k_norm) if n]
            lines.append(
                f"{layer.index:>5} {attn.num_heads:>5} {attn.num_kv_heads:>3} {attn.head_dim:>4} "
                f"{layer.ffn.intermediate_size:>6}  {' '.join(norms)}"
            )
        return "\n".join(lines)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


class _MapBuilder:
    """Derives a ModelMap from one graph; every failure names what was not found."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.initializers = set(self.graph.initializers.values())
        self._upstream: dict[ir.Value, set[ir.Value]] = {}

    def upstream(self, value: ir.Value) -> set[ir.Value]:
        """Every value ``value`` depends on (memoised: several roles ask about one input)."""
        if value not in self._upstream:
            self._upstream[value] = set(walk_back([value]))
        return self._upstream[value]

    # -- errors
    def fail(self, what: str) -> PanguLightError:
        return PanguLightError(
            f"not a decoder-only LLM graph that pangu-light understands: {what}; export it "
            "with `pangu-light export` (graphs from other exporters are not supported)"
        )

    # -- building blocks
    def is_weight(self, value: ir.Value | None) -> bool:
        return value is not None and value in self.initializers and value.const_value is not None

    def linears(self) -> list[Linear]:
        found = []
        for node in self.graph:
            if node.op_type != "MatMul" or len(node.inputs) != 2:
                continue
            rhs = node.inputs[1]
            transpose = rhs.producer() if rhs is not None else None
            if transpose is not None and transpose.op_type == "Transpose" and self.is_weight(transpose.inputs[0]):
                weight = transpose.inputs[0]
            else:
                continue
            if len(weight.shape) != 2:
                continue
            out = node.outputs[0]
            bias = bias_add = None
            consumers = out.consumers()
            if len(consumers) == 1 and consumers[0].op_type == "Add":
                other = [v for v in consumers[0].inputs if v is not out]
                if len(other) == 1 and self.is_weight(other[0]) and len(other[0].shape) == 1:
                    bias_add, bias = consumers[0], other[0]
                    out = bias_add.outputs[0]
            scopes = module_scopes(node)
            found.append(Linear(
                module=scopes[-1] if scopes else "", weight=weight, matmul=node, transpose=transpose,
                bias=bias, bias_add=bias_add, input=node.inputs[0], output=out,
            ))
        return found

    def norms(self) -> list[Norm]:
        found = []
        for node in self.graph:
            if node.op_type != "ReduceMean":
                continue
            pow_node = node.inputs[0].producer() if node.inputs[0] is not None else None
            if pow_node is None or pow_node.op_type != "Pow":
                continue
            exponent = constant_array(pow_node.inputs[1])
            if exponent is None or float(exponent.reshape(-1)[0]) != 2.0:
                continue
            x = pow_node.inputs[0]
            chain = [pow_node, node]
            add_eps = _single_consumer(node.outputs[0], "Add")
            sqrt = add_eps and _single_consumer(add_eps.outputs[0], "Sqrt")
            recip = sqrt and _single_consumer(sqrt.outputs[0], "Reciprocal")
            scale = recip and _single_consumer(recip.outputs[0], "Mul")
            if not (add_eps and sqrt and recip and scale) or x not in scale.inputs:
                continue
            eps_values = [constant_array(v) for v in add_eps.inputs if v is not node.outputs[0]]
            eps = float(eps_values[0].reshape(-1)[0]) if eps_values and eps_values[0] is not None else 0.0
            gamma_mul = _single_consumer(scale.outputs[0], "Mul")
            if gamma_mul is None:
                continue
            gamma_in = [v for v in gamma_mul.inputs if v is not scale.outputs[0]][0]
            one_plus_w = False
            nodes = chain + [add_eps, sqrt, recip, scale, gamma_mul]
            if self.is_weight(gamma_in):
                gamma = gamma_in
            elif gamma_in.producer() is not None and gamma_in.producer().op_type == "Add":
                add_one = gamma_in.producer()
                weights = [v for v in add_one.inputs if self.is_weight(v) and len(v.shape) >= 1]  # [d], or [heads, 1, d] after a CLAP merge
                ones = [constant_array(v) for v in add_one.inputs if v not in weights]
                if len(weights) != 1 or len(ones) != 1 or ones[0] is None or not np.all(ones[0] == 1):
                    continue
                gamma, one_plus_w = weights[0], True
                nodes.append(add_one)
            else:
                continue
            scopes = module_scopes(gamma_mul)
            found.append(Norm(
                role="", module=scopes[-1] if scopes else "", gamma=gamma, one_plus_w=one_plus_w,
                input=x, output=gamma_mul.outputs[0], eps=eps, nodes=nodes,
            ))
        return found

    # -- the model
    def build(self) -> ModelMap:
        graph = self.graph
        inputs = {v.name: v for v in graph.inputs}
        if "input_ids" not in inputs or not graph.outputs or graph.outputs[0].name != "logits":
            raise self.fail("expected an input 'input_ids' and a first output 'logits'")
        gathers = [n for n in inputs["input_ids"].consumers() if n.op_type == "Gather" and self.is_weight(n.inputs[0])]
        if len(gathers) != 1:
            raise self.fail("no embedding lookup (Gather of a weight by input_ids)")
        gather = gathers[0]
        embedding = gather.inputs[0]
        linears = self.linears()
        logits_source = graph.outputs[0]
        # Gemma2 soft-caps the logits (Div, Tanh, Mul by constants) after the lm_head.
        while logits_source.producer() is not None and logits_source.producer().op_type in _ELEMENTWISE:
            logits_source = logits_source.producer().inputs[0]
        lm_heads = [lin for lin in linears if lin.output is logits_source]
        if len(lm_heads) != 1:
            raise self.fail("the logits are not produced by a MatMul with a weight (lm_head)")
        lm_head = lm_heads[0]
        norms = self.norms()
        norm_by_output = {n.output: n for n in norms}
        final_norms = [n for n in norms if n.output is lm_head.input]
        if len(final_norms) != 1:
            raise self.fail("no RMSNorm directly before the lm_head")
        final_norm = final_norms[0]
        final_norm.role = "final"

        # Group linears and norms into layers by their module path (the ``...layers.N`` scope).
        layer_of: dict[int, str] = {}
        grouped_linears: dict[int, list[Linear]] = defaultdict(list)
        grouped_norms: dict[int, list[Norm]] = defaultdict(list)
        for item, bucket in [(lin, grouped_linears) for lin in linears if lin is not lm_head] + [
            (n, grouped_norms) for n in norms if n is not final_norm
        ]:
            index, scope = self.layer_index(item.matmul if isinstance(item, Linear) else item.nodes[-1])
            if index is None:
                raise self.fail(f"{item.module or 'a node'} is outside any decoder layer")
            layer_of[index] = scope
            bucket[index].append(item)
        if not layer_of:
            raise self.fail("no decoder layers found")
        indices = sorted(layer_of)
        if indices != list(range(len(indices))):
            raise self.fail(f"decoder layers are not numbered 0..n-1 (found {indices})")

        layers = [
            self.build_layer(i, layer_of[i], grouped_linears[i], grouped_norms[i], norm_by_output)
            for i in indices
        ]
        for previous, layer in zip(layers, layers[1:]):
            if layer.input is not previous.output:
                raise self.fail(f"layer {layer.index} does not read layer {previous.index}'s output")
        if final_norm.input is not layers[-1].output:
            raise self.fail("the final norm does not read the last layer's output")

        meta = self.model.metadata_props
        return ModelMap(
            family=meta.get("pangu_light.family"),
            graph_kind="decode" if any(v.name.startswith("past_key_values.") for v in graph.inputs) else "no-cache",
            hidden_size=int(embedding.shape[1]),
            vocab_size=int(embedding.shape[0]),
            embedding=embedding,
            embedding_gather=gather,
            lm_head=lm_head,
            tied_embeddings=lm_head.weight is embedding,
            final_norm=final_norm,
            layers=layers,
        )

    def layer_index(self, node: ir.Node) -> tuple[int | None, str]:
        for scope in reversed(module_scopes(node)):
            match = _LAYER_SCOPE.match(scope)
            if match:
                return int(match.group("index")), scope
        return None, ""

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
            raise self.fail(f"{where}: no q/k/v projections reading one normalised input")
        qkv = qkv_candidates[0]
        pre_attn = norm_by_output.get(qkv[0].input)
        if pre_attn is None or pre_attn not in norms:
            raise self.fail(f"{where}: q/k/v do not read an RMSNorm of this layer")
        pre_attn.role = "pre_attn"

        attention = self.build_attention(where, scope, qkv, linears, norms)
        ffn = self.build_ffn(where, linears, attention)
        layer_norms = {"pre_attn": pre_attn}
        pre_ffn = norm_by_output.get(ffn.gate.input)
        if pre_ffn is None or pre_ffn not in norms:
            raise self.fail(f"{where}: gate/up do not read an RMSNorm of this layer")
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
            raise self.fail(f"{where}: RMSNorm(s) with no recognised role: {unassigned}")

        # Residual stream: the layer input feeds the pre-attention norm; the layer output is
        # the Add of (mid residual, FFN branch).
        layer_input = pre_attn.input
        attn_branch = layer_norms.get("post_attn", None)
        attn_out = attn_branch.output if attn_branch else attention.o.output
        add1 = _add_joining(attn_out, layer_input)
        if add1 is None:
            raise self.fail(f"{where}: no residual Add after the attention block")
        mid = add1.outputs[0]
        if pre_ffn.input is not mid:
            raise self.fail(f"{where}: the pre-FFN norm does not read the attention residual")
        ffn_branch = layer_norms.get("post_ffn", None)
        ffn_out = ffn_branch.output if ffn_branch else ffn.down.output
        add2 = _add_joining(ffn_out, mid)
        if add2 is None:
            raise self.fail(f"{where}: no residual Add after the FFN block")
        return Layer(
            index=index, module=scope, input=layer_input, output=add2.outputs[0],
            norms=layer_norms, attention=attention, ffn=ffn, residual_adds=[add1, add2],
        )

    def build_attention(self, where, scope, qkv, linears, norms) -> Attention:
        softmaxes = [
            n for lin in qkv for n in _nodes_after(lin.output, 40) if n.op_type == "Softmax"
        ]
        if not softmaxes:
            raise self.fail(f"{where}: no Softmax after the q/k/v projections")
        softmax = softmaxes[0]
        scores = _first_producer_upstream(softmax.inputs[0], "MatMul")
        context = next((n for n in _nodes_after(softmax.outputs[0], 4) if n.op_type == "MatMul"), None)
        if scores is None or context is None:
            raise self.fail(f"{where}: attention MatMuls around the Softmax not found")
        qkv_outputs = {lin.output: lin for lin in qkv}

        def source(value: ir.Value) -> Linear:
            hits = [qkv_outputs[v] for v in walk_back([value]) if v in qkv_outputs]
            if len(hits) != 1:
                raise self.fail(f"{where}: cannot tell which projection feeds an attention MatMul")
            return hits[0]

        q, k, v = source(scores.inputs[0]), source(scores.inputs[1]), source(context.inputs[1])
        if len({id(q), id(k), id(v)}) != 3:
            raise self.fail(f"{where}: q, k and v projections are not distinct")
        after_context = [
            (lin, self.upstream(lin.input))
            for lin in linears
            if lin not in qkv and context.outputs[0] in self.upstream(lin.input)
        ]
        # o_proj is the first of them: no other linear after the attention feeds it.
        o_candidates = [
            lin for lin, upstream in after_context
            if not any(other.output in upstream for other, _ in after_context if other is not lin)
        ]
        if len(o_candidates) != 1:
            raise self.fail(f"{where}: no o_proj after the attention")
        o = o_candidates[0]

        # q/k norms sit between a projection and the scores MatMul (Qwen3, Gemma3).
        between_q = set(walk_back([scores.inputs[0]], stop={q.output}))
        between_k = set(walk_back([scores.inputs[1]], stop={k.output}))
        q_norm = k_norm = None
        for n in norms:
            if n.output in between_q:
                n.role, q_norm = "q_norm", n
            elif n.output in between_k:
                n.role, k_norm = "k_norm", n

        constants, num_kv_heads, num_heads = self.head_counts(where, scores, context)
        head_dim_from_k = k.out_features
        if num_kv_heads is None:  # no GQA expansion: as many KV heads as query heads
            head_dim = self.view_head_dim(where, k)
            num_kv_heads = num_heads = k.out_features // head_dim
        head_dim = head_dim_from_k // num_kv_heads
        if q.out_features != num_heads * head_dim or o.in_features != num_heads * head_dim:
            raise self.fail(
                f"{where}: q_proj has {q.out_features} rows, expected {num_heads} heads x {head_dim}"
            )
        past_key, present_key = self.cache_pair(k.output)
        past_value, present_value = self.cache_pair(v.output)
        return Attention(
            module=scope, q=q, k=k, v=v, o=o, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, head_count_constants=constants, q_norm=q_norm, k_norm=k_norm,
            context=o.input, past_key=past_key, past_value=past_value,
            present_key=present_key, present_value=present_value,
        )

    def head_counts(self, where, scores: ir.Node, context: ir.Node):
        constants: list[HeadCountConstant] = []
        num_kv = num_heads = None
        for operand in (scores.inputs[1], context.inputs[1]):
            expand = _first_producer_upstream(operand, "Expand", limit=4)
            if expand is None:
                continue
            concat = expand.inputs[1].producer()
            if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 5:
                raise self.fail(f"{where}: GQA Expand shape is not a 5-part Concat")
            kv = constant_array(concat.inputs[1])
            rep = constant_array(concat.inputs[2])
            if kv is None or rep is None:
                raise self.fail(f"{where}: GQA head counts are not constants")
            constants += [HeadCountConstant(concat, 1, "kv_heads"), HeadCountConstant(concat, 2, "heads_per_group")]
            num_kv, n_rep = int(kv.reshape(-1)[0]), int(rep.reshape(-1)[0])
            reshape = _single_consumer(expand.outputs[0], "Reshape") or _through_identity(expand.outputs[0], "Reshape")
            shape_concat = reshape.inputs[1].producer() if reshape is not None else None
            if shape_concat is None or shape_concat.op_type != "Concat" or constant_array(shape_concat.inputs[1]) is None:
                raise self.fail(f"{where}: the Reshape after the GQA Expand has no constant head count")
            constants.append(HeadCountConstant(shape_concat, 1, "heads"))
            num_heads = int(constant_array(shape_concat.inputs[1]).reshape(-1)[0])
            if num_heads != num_kv * n_rep:
                raise self.fail(f"{where}: head counts disagree ({num_kv} x {n_rep} != {num_heads})")
        return constants, num_kv, num_heads

    def view_head_dim(self, where, k: Linear) -> int:
        reshape = _single_consumer(k.output, "Reshape")
        shape = reshape.inputs[1].producer() if reshape is not None else None
        if shape is None or shape.op_type != "Concat":
            raise self.fail(f"{where}: k_proj output is not reshaped into heads")
        head_dim = constant_array(shape.inputs[-1])
        if head_dim is None:
            raise self.fail(f"{where}: head_dim is not a constant")
        return int(head_dim.reshape(-1)[0])

    def cache_pair(self, projection_out: ir.Value):
        graph_inputs = set(self.graph.inputs)
        graph_outputs = set(self.graph.outputs)
        for node in _nodes_after(projection_out, 40):
            if node.op_type == "Concat" and node.outputs[0] in graph_outputs and node.inputs[0] in graph_inputs:
                return node.inputs[0], node.outputs[0]
        return None, None

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
            raise self.fail(f"{where}: cannot identify the FFN down projection")
        down, feeders = down_candidates[0]
        if len(feeders) == 1:
            fused = feeders[0]
            return FeedForward(
                module=_common_prefix(fused.module, down.module), gate=fused, up=fused, down=down,
                fused_gate_up=True, intermediate_size=down.in_features,
            )
        if len(feeders) != 2:
            raise self.fail(f"{where}: expected gate and up projections before down_proj")
        product = down.input.producer()
        # up feeds the product directly; gate goes through the activation first.
        direct = [lin for lin in feeders if product is not None and lin.output in product.inputs]
        if product is None or len(direct) != 1:
            raise self.fail(f"{where}: cannot tell gate_proj from up_proj")
        up = direct[0]
        gate = feeders[0] if feeders[1] is up else feeders[1]
        return FeedForward(
            module=_common_prefix(gate.module, down.module), gate=gate, up=up, down=down,
            fused_gate_up=False, intermediate_size=down.in_features,
        )


def _single_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    consumers = [n for n in value.consumers() if n.op_type == op_type]
    return consumers[0] if len(consumers) == 1 else None


def _through_identity(value: ir.Value, op_type: str) -> ir.Node | None:
    identity = _single_consumer(value, "Identity")
    return _single_consumer(identity.outputs[0], op_type) if identity is not None else None


def _nodes_after(value: ir.Value, limit: int) -> list[ir.Node]:
    """Nodes reachable forward from ``value`` within ``limit`` steps (breadth first)."""
    seen: list[ir.Node] = []
    frontier = [value]
    for _ in range(limit):
        next_frontier = []
        for v in frontier:
            for node in v.consumers():
                if node not in seen:
                    seen.append(node)
                    next_frontier.extend(node.outputs)
        if not next_frontier:
            break
        frontier = next_frontier
    return seen


def _first_producer_upstream(value: ir.Value, op_type: str, limit: int = 12) -> ir.Node | None:
    """The nearest node of ``op_type`` that ``value`` depends on, following first inputs."""
    current = value
    for _ in range(limit):
        node = current.producer() if current is not None else None
        if node is None:
            return None
        if node.op_type == op_type:
            return node
        current = node.inputs[0]
    return None


def _add_joining(branch: ir.Value, residual: ir.Value) -> ir.Node | None:
    for node in branch.consumers():
        if node.op_type == "Add" and residual in node.inputs:
            return node
    return None


def _common_prefix(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)
