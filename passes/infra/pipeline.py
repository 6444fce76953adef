"""A pipeline as data: pass names with options, a one-line text form that prints back.

Grammar of the text form (whitespace between tokens is ignored on input, never printed)::

    pipeline := pass ("," pass)*
    pass     := NAME ["{" [option ("," option)*] "}"]        NAME is kebab-case: slice-hidden
    option   := KEY "=" value                                 KEY is snake_case: keep_first
    value    := "[" [value ("," value)*] "]" | scalar
    scalar   := true | false | INT | FLOAT | BARE | "quoted string"

Example: ``drop-layers{layers=[3,7]},slice-hidden{keep_first=448},slnp``.
``str(Pipeline.parse(text)) == text`` for canonical text: no spaces, no empty braces, floats
as Python writes them (``0.5``, ``1e-05``), strings bare unless they would read back as
something else (then double-quoted). The JSON form is a list of ``{"pass": name, **options}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pangu_light.core.errors import PanguLightError

__all__ = ["PassSpec", "Pipeline", "OptionValue", "format_value"]

OptionValue = Any  # bool | int | float | str | list[OptionValue]

_NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
# A bare word: anything but separators, quotes and whitespace.
_BARE_RE = re.compile(r"[^\s,{}\[\]=\"]+")


@dataclasses.dataclass
class PassSpec:
    """One step of a pipeline: a registered pass name and its options (not yet validated)."""

    name: str
    options: dict[str, OptionValue] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise PanguLightError(
                f"pass name {self.name!r} is not kebab-case; write it like 'slice-hidden'"
            )
        for key, value in self.options.items():
            if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key == "pass":
                raise PanguLightError(
                    f"pass {self.name}: option name {key!r} is not a valid key; "
                    "use snake_case like 'keep_first' (and not 'pass')"
                )
            _check_value(value, f"pass {self.name} option {key}")

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = ",".join(f"{k}={format_value(v)}" for k, v in self.options.items())
        return f"{self.name}{{{body}}}"

    def to_json(self) -> dict[str, OptionValue]:
        return {"pass": self.name, **_json_copy(self.options)}


@dataclasses.dataclass
class Pipeline:
    """An ordered list of PassSpec; ``str()`` gives the canonical one-line text form."""

    passes: list[PassSpec] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.passes = list(self.passes)
        for spec in self.passes:
            if not isinstance(spec, PassSpec):
                raise TypeError(f"Pipeline takes PassSpec items, got {type(spec).__name__}")

    def __str__(self) -> str:
        return ",".join(str(spec) for spec in self.passes)

    def __iter__(self) -> Iterator[PassSpec]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __getitem__(self, index: int) -> PassSpec:
        return self.passes[index]

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Parse the text form; errors name the character position and what was expected."""
        if not isinstance(text, str):
            raise TypeError(f"Pipeline.parse takes a str, got {type(text).__name__}")
        return cls(_Parser(text).parse())

    @classmethod
    def from_json(cls, items: Sequence[Mapping[str, OptionValue]]) -> Pipeline:
        """Build from ``[{"pass": name, **options}, ...]`` (the plan/JSON form)."""
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise PanguLightError(
                'a JSON pipeline must be a list of {"pass": name, ...options} objects'
            )
        specs = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "pass" not in item:
                raise PanguLightError(
                    f'pipeline entry {i} ({item!r}) has no "pass" key; write '
                    '{"pass": "slice-hidden", "keep_first": 448}'
                )
            options = {k: _json_copy(v) for k, v in item.items() if k != "pass"}
            specs.append(PassSpec(item["pass"], options))
        return cls(specs)

    def to_json(self) -> list[dict[str, OptionValue]]:
        return [spec.to_json() for spec in self.passes]


def format_value(value: OptionValue) -> str:
    """The canonical text of one option value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PanguLightError(f"option value {value!r} is not finite; use a finite number")
        return repr(value)
    if isinstance(value, str):
        if _reads_back_as_bare_string(value):
            return value
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise PanguLightError(
        f"option value {value!r} of type {type(value).__name__} has no text form; "
        "use a bool, int, float, string or list of those"
    )


def _reads_back_as_bare_string(value: str) -> bool:
    return (
        _BARE_RE.fullmatch(value) is not None
        and value not in ("true", "false")
        and not _INT_RE.fullmatch(value)
        and not _FLOAT_RE.fullmatch(value)
    )


def _check_value(value: OptionValue, where: str) -> None:
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, where)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise PanguLightError(f"{where}: value {value!r} is not finite; use a finite number")
    if not isinstance(value, (bool, int, float, str)):
        raise PanguLightError(
            f"{where}: value {value!r} of type {type(value).__name__} is not allowed; "
            "use a bool, int, float, string or list of those"
        )


def _json_copy(value: OptionValue) -> OptionValue:
    """Deep copy with tuples turned into lists, so JSON and text forms agree."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    return value


class _Parser:
    """Recursive descent over the text; ``pos`` is a 0-based character index."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, expected: str) -> PanguLightError:
        if self.pos >= len(self.text):
            found = "end of text"
        else:
            found = repr(self.text[self.pos])
        return PanguLightError(
            f"bad pipeline {self.text!r}: at position {self.pos} expected {expected}, "
            f"found {found}; write it like 'drop-layers{{layers=[3,7]}},slnp'"
        )

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, expected: str) -> None:
        if self.peek() != char:
            raise self.error(expected)
        self.pos += 1

    def match(self, pattern: re.Pattern[str], expected: str) -> str:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(expected)
        self.pos = m.end()
        return m.group(0)

    def parse(self) -> list[PassSpec]:
        specs = [self.parse_pass()]
        while self.peek() == ",":
            self.pos += 1
            specs.append(self.parse_pass())
        if self.peek():
            raise self.error("',' before the next pass, or the end of the pipeline")
        return specs

    def parse_pass(self) -> PassSpec:
        name = self.match(_NAME_RE, "a pass name (kebab-case, like 'slice-hidden')")
        # A name must end at a separator: 'slice_hidden' is not 'slice' followed by junk.
        if self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "_-"):
            raise self.error(
                f"'{{', ',' or the end after pass name {name!r} "
                "(pass names are kebab-case, like 'slice-hidden')"
            )
        options: dict[str, OptionValue] = {}
        if self.peek() == "{":
            self.pos += 1
            if self.peek() == "}":
                self.pos += 1
                return PassSpec(name, options)
            while True:
                key_pos = self.pos
                key = self.match(_KEY_RE, "an option name (like 'keep_first')")
                if key in options or key == "pass":
                    self.pos = key_pos
                    self.skip_ws()
                    what = "is reserved" if key == "pass" else "is given twice"
                    raise PanguLightError(
                        f"bad pipeline {self.text!r}: at position {self.pos} option {key!r} "
                        f"of pass {name} {what}; give each option once"
                    )
                self.expect("=", f"'=' after option name {key!r}")
                options[key] = self.parse_value()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("}", "',' or '}' after an option value")
                break
        return PassSpec(name, options)

    def parse_value(self) -> OptionValue:
        char = self.peek()
        if char == "[":
            self.pos += 1
            items: list[OptionValue] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.parse_value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]", "',' or ']' in a list")
                return items
        if char == '"':
            return self.parse_quoted()
        word = self.match(_BARE_RE, "a value (number, true/false, word, or [list])")
        if word == "true":
            return True
        if word == "false":
            return False
        if _INT_RE.fullmatch(word):
            return int(word)
        if _FLOAT_RE.fullmatch(word):
            return float(word)
        return word

    def parse_quoted(self) -> str:
        decoder = json.JSONDecoder()
        try:
            value, end = decoder.raw_decode(self.text, self.pos)
        except json.JSONDecodeError:
            raise self.error('a closing \'"\' for a quoted string') from None
        self.pos = end
        return value
