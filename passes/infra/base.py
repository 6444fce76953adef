"""The base class of every pangu-light rewrite pass: validated options, tags and counts.

A pass is an onnx-ir in-place pass (``call(model) -> PassResult(model, modified)``, with
``requires``/``ensures`` checked around it by ``onnx_ir.passes.PassBase.__call__``) plus:

- ``name``: the registry name (kebab-case), used in pipelines, tags, reports and errors;
- ``options_schema``: ``{option: Option(kind, default)}`` (or a bare kind for a required
  option). ``kind`` is ``bool``, ``int``, ``float``, ``str``, ``list``, ``list[int]``, ... or a
  validator ``f(value) -> value`` that raises ValueError/TypeError. Unknown options and
  wrong types are errors that list the valid options;
- ``tag(node_or_value)``: records the pass in ``metadata_props[contract.PASS_TAG]``;
- ``count(key, n)``: per-run counters, readable as ``pass_.stats`` after the run.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra.pipeline import format_value

__all__ = ["Option", "PanguPass", "REQUIRED"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a pass: its kind (a type, ``list[T]``, or a validator) and default."""

    kind: Any
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        text = f"{_kind_name(self.kind)}"
        if not self.required:
            text += f", default {format_value(self.default)}" if self.default is not None else ", optional"
        return text


class PanguPass(ir.passes.InPlacePass):
    """Base of all pangu-light passes; subclasses set ``name``, ``options_schema``, ``call``."""

    name: ClassVar[str] = ""
    options_schema: ClassVar[Mapping[str, Option | Any]] = {}

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set the class attribute 'name'")
        self.options: dict[str, Any] = self._resolve_options(dict(options or {}))
        self.stats: dict[str, int | float] = {}

    # -- options -------------------------------------------------------------------------

    @classmethod
    def schema(cls) -> dict[str, Option]:
        """``options_schema`` with bare kinds normalised to required ``Option``s."""
        return {
            key: spec if isinstance(spec, Option) else Option(spec)
            for key, spec in cls.options_schema.items()
        }

    @classmethod
    def describe_options(cls) -> str:
        schema = cls.schema()
        if not schema:
            return "none"
        return ", ".join(f"{key} ({opt.describe()})" for key, opt in schema.items())

    def _resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        schema = self.schema()
        unknown = [key for key in given if key not in schema]
        if unknown:
            raise PanguLightError(
                f"pass {self.name}: unknown option {', '.join(map(repr, unknown))}; "
                f"valid options: {self.describe_options()}"
            )
        resolved: dict[str, Any] = {}
        for key, opt in schema.items():
            if key not in given:
                if opt.required:
                    raise PanguLightError(
                        f"pass {self.name}: option {key!r} is required; "
                        f"valid options: {self.describe_options()}"
                    )
                resolved[key] = opt.default
                continue
            try:
                resolved[key] = _coerce(given[key], opt.kind)
            except (TypeError, ValueError) as error:
                raise PanguLightError(
                    f"pass {self.name}: option {key}={_show(given[key])} is invalid ({error}); "
                    f"valid options: {self.describe_options()}"
                ) from None
        return resolved

    # -- running -------------------------------------------------------------------------

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        self.stats = {}
        return super().__call__(model_or_result)

    def count(self, key: str, n: int | float = 1) -> None:
        """Add ``n`` to the counter ``key`` of this run (``pass_.stats``)."""
        self.stats[key] = self.stats.get(key, 0) + n

    def tag(self, obj: ir.Node | ir.Value) -> None:
        """Record this pass in ``obj.metadata_props[contract.PASS_TAG]`` (comma-separated)."""
        props = obj.metadata_props
        previous = props.get(contract.PASS_TAG)
        if not previous:
            props[contract.PASS_TAG] = self.name
        elif self.name not in previous.split(","):
            props[contract.PASS_TAG] = f"{previous},{self.name}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def __str__(self) -> str:
        return self.name


def check_indices(
    indices: Sequence[int], size: int, *, out_of_range: Callable[[int], str], repeated: Callable[[int], str]
) -> None:
    """Raise PanguLightError when an index is outside 0..size-1 (``out_of_range(index)`` says
    so) or appears twice (``repeated(index)``); the messages are the caller's, so each names
    its own axis."""
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise PanguLightError(out_of_range(bad[0]))
    if len(set(indices)) != len(indices):
        raise PanguLightError(repeated(next(i for i in indices if list(indices).count(i) > 1)))


def _show(value: Any) -> str:
    try:
        return format_value(value)
    except PanguLightError:
        return repr(value)


def _kind_name(kind: Any) -> str:
    if isinstance(kind, type):
        return kind.__name__
    if typing.get_origin(kind) is not None:
        return str(kind).replace("typing.", "")
    return getattr(kind, "__name__", repr(kind))


def _coerce(value: Any, kind: Any) -> Any:
    """Check ``value`` against ``kind`` and return it (ints widen to float, tuples to lists)."""
    origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        (item_kind,) = typing.get_args(kind) or (Any,)
        return [_coerce(item, item_kind) for item in value]
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {type(value).__name__}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value
    if kind is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return list(value)
    if callable(kind) and not isinstance(kind, type):
        return kind(value)
    raise TypeError(f"option kind {kind!r} is not supported by PanguPass")

