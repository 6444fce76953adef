"""Graph regions as declarative patterns, and the small matcher that finds them.

A pattern is an expression tree written the way the region computes: ``Op`` nodes (an
operator over input patterns, optionally commutative), ``Var`` (any value; one name binds one
value, so ``x`` twice means the same tensor), ``Weight`` (an initializer of a given rank) and
``Const`` (a constant passing a test). ``match(pattern, value)`` matches backwards from the
value a region produces and returns the bound values and matched nodes, or None. Matching
only reads the graph (the role onnxscript's rewriter patterns play, without rewriting).

The regions the model map and the passes look for::

    RMSNorm   x -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .) -> Mul(gamma)
              gamma = w  |  Add(w, 1)                                  (Gemma's 1 + w)
    Linear    MatMul(x, Transpose(W[out, in]))  [-> Add(bias[out])]
    GQA       Reshape(Expand(kv, Concat[b, n_kv, n_rep, t, d]), Concat[b, n_heads, t, d])
              (an Identity may sit between Expand and Reshape)
    heads-first view   Reshape(x, Concat[b, heads, s, d])  with heads a one-element constant
              (GLM4's interleaved rotary flattens each rotated half back this way)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

__all__ = [
    "Op", "Var", "Weight", "Const", "AnyOf", "Match", "match",
    "RMS_NORM", "LINEAR", "LINEAR_BIAS", "GQA_EXPAND", "HEADS_FIRST_VIEW",
    "is_weight", "scalar",
]


@dataclasses.dataclass(frozen=True)
class Var:
    """Any value; bound under ``name`` (when given), and the same name must bind the same value."""

    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Weight:
    """An initializer with contents; ``rank`` exact, or at least ``min_rank``."""

    name: str
    rank: int | None = None
    min_rank: int = 0


@dataclasses.dataclass(frozen=True)
class Const:
    """A constant value (initializer or folded constant) whose array passes ``test``."""

    name: str | None = None
    test: Callable[[np.ndarray], bool] | None = None


@dataclasses.dataclass(frozen=True)
class AnyOf:
    """The first alternative that matches."""

    alternatives: tuple[Pattern, ...]


@dataclasses.dataclass(frozen=True)
class Op:
    """The node producing the value: ``op_type`` over ``inputs`` (all of them, unless ``rest``
    allows more after those given); ``commutative`` also tries two inputs swapped."""

    op_type: str
    inputs: tuple[Pattern, ...]
    name: str | None = None
    commutative: bool = False
    rest: bool = False
    test: Callable[[ir.Node], bool] | None = None


Pattern = Op | Var | Weight | Const | AnyOf


@dataclasses.dataclass
class Match:
    """What a pattern bound: values and nodes by name, and every matched node (root last)."""

    bound: dict[str, ir.Value | ir.Node]
    nodes: list[ir.Node]

    def __getitem__(self, name: str):
        return self.bound[name]

    def get(self, name: str):
        return self.bound.get(name)


def match(pattern: Pattern, value: ir.Value | None, bound: dict | None = None) -> Match | None:
    """The first way ``pattern`` produces ``value`` (given names already ``bound``), or None."""
    if value is None:
        return None
    for names, nodes in _match(pattern, value, dict(bound or {}), ()):
        return Match(names, list(nodes))
    return None


def is_weight(value: ir.Value | None) -> bool:
    """An initializer of the graph with contents (a parameter or a constant buffer)."""
    return value is not None and value.is_initializer() and value.const_value is not None


def scalar(value: ir.Value | None) -> float | None:
    """The first element of a constant, else None."""
    if value is None or value.const_value is None:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


_State = Iterator[tuple[dict, tuple[ir.Node, ...]]]


def _bind(bound: dict, name: str | None, item) -> dict | None:
    if name is None:
        return bound
    if name in bound:
        return bound if bound[name] is item else None
    return {**bound, name: item}


def _match(pattern: Pattern, value: ir.Value, bound: dict, nodes: tuple) -> _State:
    if isinstance(pattern, Var):
        names = _bind(bound, pattern.name, value)
        if names is not None:
            yield names, nodes
    elif isinstance(pattern, Weight):
        rank = len(value.shape) if value.shape is not None else None
        if is_weight(value) and rank is not None and (pattern.rank is None or rank == pattern.rank) \
                and rank >= pattern.min_rank:
            names = _bind(bound, pattern.name, value)
            if names is not None:
                yield names, nodes
    elif isinstance(pattern, Const):
        if value.const_value is not None and (pattern.test is None or pattern.test(value.const_value.numpy())):
            names = _bind(bound, pattern.name, value)
            if names is not None:
                yield names, nodes
    elif isinstance(pattern, AnyOf):
        for alternative in pattern.alternatives:
            yield from _match(alternative, value, bound, nodes)
    else:
        yield from _match_op(pattern, value, bound, nodes)


def _match_op(pattern: Op, value: ir.Value, bound: dict, nodes: tuple) -> _State:
    node = value.producer()
    if node is None or node.op_type != pattern.op_type:
        return
    given = len(pattern.inputs)
    if len(node.inputs) < given or (len(node.inputs) > given and not pattern.rest):
        return
    if pattern.test is not None and not pattern.test(node):
        return
    names = _bind(bound, pattern.name, node)
    if names is None:
        return
    orders = [list(node.inputs[:given])]
    if pattern.commutative and given == 2:
        orders.append(orders[0][::-1])
    for order in orders:
        for result, inner in _match_inputs(pattern.inputs, order, names, nodes):
            yield result, inner + (node,)


def _match_inputs(patterns, values, bound: dict, nodes: tuple) -> _State:
    if not patterns:
        yield bound, nodes
        return
    if values[0] is None:
        return
    for names, inner in _match(patterns[0], values[0], bound, nodes):
        yield from _match_inputs(patterns[1:], values[1:], names, inner)


# ------------------------------------------------------------------------------ the regions


def _is_two(array: np.ndarray) -> bool:
    return array.size >= 1 and float(array.reshape(-1)[0]) == 2.0


def _all_ones(array: np.ndarray) -> bool:
    return bool(np.all(array == 1))


_HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _cast_to(node: ir.Node) -> ir.DataType | None:
    attribute = node.attributes.get("to")
    return None if attribute is None else ir.DataType(attribute.value)


def _is_upcast(node: ir.Node) -> bool:
    return _cast_to(node) == ir.DataType.FLOAT and node.inputs[0].dtype in _HALF


def _is_downcast(node: ir.Node) -> bool:
    return _cast_to(node) in _HALF


def _upcast(pattern: Pattern, name: str) -> AnyOf:
    """``pattern``, or ``pattern`` cast from half precision to float32 (a half graph's norms
    compute in float32, as the torch modules do)."""
    return AnyOf((Op("Cast", (pattern,), name=name, test=_is_upcast), pattern))


_X = _upcast(Var("x"), "upcast")
_INV_RMS = Op("Reciprocal", (
    Op("Sqrt", (
        Op("Add", (
            Op("ReduceMean", (Op("Pow", (_X, Const(test=_is_two)), name="pow"),), name="mean", rest=True),
            Var("eps"),
        ), name="add_eps", commutative=True),
    ), name="sqrt"),
), name="reciprocal")

_SCALE = Op("Mul", (_X, _INV_RMS), name="scale", commutative=True)
_GAMMA_MUL = Op("Mul", (
    AnyOf((Op("Cast", (_SCALE,), name="downcast", test=_is_downcast), _SCALE)),
    AnyOf((
        Weight("w"),
        Op("Add", (_upcast(Weight("w", min_rank=1), "gamma_upcast"), Const(test=_all_ones)),
           name="add_one", commutative=True),
    )),
), name="gamma_mul", commutative=True)

RMS_NORM = AnyOf((Op("Cast", (_GAMMA_MUL,), name="output_cast", test=_is_downcast), _GAMMA_MUL))
"""y = gamma * x / sqrt(mean(x^2) + eps); binds x, eps, w and the nodes pow, mean, add_eps,
sqrt, reciprocal, scale, gamma_mul (and add_one for ``1 + w``). In a float16/bfloat16 graph
the norm computes in float32 between Casts, as the torch modules do: ``upcast`` of x,
``downcast`` of the normalised x before a half gamma (Llama, Qwen), or ``gamma_upcast`` of w
and ``output_cast`` of the product (Gemma's ``(x * (1 + w.float())).type_as(x)``)."""

LINEAR = Op("MatMul", (Var("x"), Op("Transpose", (Weight("w", rank=2),), name="transpose")), name="matmul")
"""y = x W^T with W an initializer [out, in]; binds x, w, transpose, matmul."""

LINEAR_BIAS = Op("Add", (Var("y"), Weight("bias", rank=1)), name="bias_add", commutative=True)
"""The optional bias after a Linear: matched with ``y`` bound to the MatMul output."""

_EXPAND = Op("Expand", (
    Var("kv"),
    Op("Concat", (Var(), Const("kv_heads"), Const("heads_per_group"), Var(), Var()), name="expand_shape"),
), name="expand")

GQA_EXPAND = Op("Reshape", (
    AnyOf((_EXPAND, Op("Identity", (_EXPAND,)))),
    Op("Concat", (Var(), Const("heads")), name="reshape_shape", rest=True),
), name="reshape")
"""repeat_kv: K/V heads expanded n_rep times and flattened to the query heads; binds kv, the
constants kv_heads, heads_per_group, heads and the nodes expand_shape, reshape_shape."""

HEADS_FIRST_VIEW = Op("Reshape", (
    Var(),
    Op("Concat", (Var(), Const("heads", test=lambda a: a.size == 1), Var(), Var()), name="shape"),
), name="reshape")
"""A view to ``[b, heads, s, d]`` whose head count is a constant; binds heads, shape, reshape."""
