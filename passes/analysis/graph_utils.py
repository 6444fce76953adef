"""Small graph queries and edits shared by the model map and the passes (onnx-ir objects)."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

__all__ = [
    "NAME_SCOPES_KEY",
    "module_scopes",
    "constant_array",
    "walk_back",
    "replace_initializer",
]

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_scopes(node: ir.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first (``['', 'model', 'model.layers.0', ...]``)."""
    raw = node.metadata_props.get(NAME_SCOPES_KEY)
    if not raw:
        return []
    scopes = ast.literal_eval(raw)
    # The last entry names the FX node itself, not a module.
    return [s for s in scopes[:-1] if s]


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

