"""Small graph queries and edits shared by the model map and the passes (onnx-ir objects):
module scopes, constants, walking back through producers, who reads a value, initializer
contents."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from pangu_light.core import contract

__all__ = [
    "module_scopes",
    "in_scope",
    "common_prefix",
    "constant_array",
    "walk_back",
    "outside_readers",
    "exclusive",
    "replace_initializer",
]


def module_scopes(node: ir.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first (``['model', 'model.layers.0', ...]``)."""
    raw = node.metadata_props.get(contract.TORCH_NAME_SCOPES)
    if not raw:
        return []
    scopes = ast.literal_eval(raw)
    # The last entry names the FX node itself, not a module.
    return [s for s in scopes[:-1] if s]


def in_scope(node: ir.Node, scope: str) -> bool:
    """Whether ``node`` was exported from inside module ``scope`` (or one of its children)."""
    return any(s == scope or s.startswith(scope + ".") for s in module_scopes(node))


def common_prefix(a: str, b: str) -> str:
    """The longest common dotted prefix of two module paths (``model.layers.0.mlp``)."""
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer or folded constant), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def walk_back(start: Iterable[ir.Value], stop: set[ir.Value] | None = None) -> Iterator[ir.Value]:
    """Every value that ``start`` depends on (including ``start``), not crossing ``stop``."""
    stop = stop or set()
    seen: set[ir.Value] = set()
    stack = [v for v in start if v is not None]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        yield value
        if value in stop:
            continue
        node = value.producer()
        if node is not None:
            stack.extend(v for v in node.inputs if v is not None)


def outside_readers(value: ir.Value, region: Iterable[ir.Node]) -> list[ir.Node]:
    """The nodes outside ``region`` that read ``value`` (each once, in use order)."""
    inside = set(region)
    return list(dict.fromkeys(use.node for use in value.uses() if use.node not in inside))


def exclusive(value: ir.Value, region: Iterable[ir.Node]) -> bool:
    """Whether only nodes of ``region`` read ``value``: no other node, and it is neither a
    graph input nor a graph output. A pass that edits ``value`` for one region checks this
    first, so the edit cannot change what anything else computes."""
    return not outside_readers(value, region) and not value.is_graph_input() and not value.is_graph_output()


def replace_initializer(value: ir.Value, array: np.ndarray) -> None:
    """Give initializer ``value`` new contents (and shape), keeping its name and dtype."""
    dtype = value.const_value.dtype if value.const_value is not None else None
    if dtype is not None:
        array = array.astype(dtype.numpy(), copy=False)
    tensor = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.const_value = tensor
    value.shape = ir.Shape(array.shape)
    if dtype is not None:
        value.dtype = dtype
