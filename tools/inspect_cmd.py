"""Print what a graph is: the model map derived from it, its inputs and outputs, its provenance.

    pangu-light inspect model.onnx          # a table: one line per layer
    pangu-light inspect model.onnx --json   # everything as one JSON object

The model map (family, hidden size, vocabulary, per-layer heads / KV heads / head_dim / FFN
width, norms and their roles) is derived from the graph itself, exactly as the passes see it,
so inspecting a pruned graph shows its per-layer shapes. The graph's inputs and outputs are
listed with their shapes (symbolic dimensions by name), and the pangu_light.* metadata
(family, graph kind, source model, tokenizer, and for compiled graphs the pipeline and each
pass's counts) is printed when present.

With --json the output is one object: {"file", "model_map", "inputs", "outputs", "metadata"};
"model_map" is the map's full JSON (tensor names of every norm, projection and head-count
constant); metadata values that hold JSON are parsed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.model_map import ModelMap
from pangu_light.passes.infra.graph_io import load_model

__all__ = ["HELP", "add_arguments", "run", "describe"]

HELP = "print the model map, inputs/outputs and provenance of a graph"

METADATA_PREFIX = "pangu_light."
# Printed in full only with --json: a whole config.json is noise in the table.
_LONG_KEYS = (contract.SOURCE_CONFIG,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="an .onnx graph (from `pangu-light export` or `compile`)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _shape(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        else:
            dims.append(getattr(dim, "value", None))
    return dims


def _io(values) -> list[dict[str, Any]]:
    return [
        {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": _shape(v)}
        for v in values
    ]


def _metadata(model: ir.Model) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in model.metadata_props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            parsed = value
        out[key] = parsed if isinstance(parsed, (dict, list)) else value
    return out


def describe(path: Path) -> tuple[ModelMap, dict[str, Any]]:
    """Load ``path`` and return its model map and the JSON description ``inspect --json`` prints."""
    model = load_model(path)
    try:
        model_map = ModelMap.from_model(model)
    except PanguLightError as error:
        raise PanguLightError(f"{path}: {error}") from None
    return model_map, {
        "file": str(path),
        "model_map": model_map.to_json(),
        "inputs": _io(model.graph.inputs),
        "outputs": _io(model.graph.outputs),
        "metadata": _metadata(model),
    }


def _format_io(entries: list[dict[str, Any]], limit: int = 6) -> list[str]:
    """Inputs/outputs one per line; a decode graph's many cache tensors are elided in the middle."""

    def line(e):
        dims = ", ".join("?" if d is None else str(d) for d in (e["shape"] or []))
        return f"    {e['name']:<32} {e['dtype'] or '?':<8} [{dims}]"

    if len(entries) <= 2 * limit:
        return [line(e) for e in entries]
    head, tail = entries[:limit], entries[-2:]
    return [line(e) for e in head] + [f"    ... {len(entries) - limit - 2} more ..."] + [line(e) for e in tail]


def _format_metadata(metadata: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in metadata.items():
        if key in _LONG_KEYS:
            lines.append(f"    {key}: ({len(json.dumps(value))} characters; see --json)")
        elif key == contract.PASS_STATS and isinstance(value, list):
            lines.append(f"    {key}:")
            for entry in value:
                if isinstance(entry, dict):
                    stats = entry.get("stats") or {}
                    counts = ", ".join(f"{k}={v}" for k, v in stats.items()) if isinstance(stats, dict) else str(stats)
                    changed = "changed" if entry.get("modified") else "unchanged"
                    lines.append(f"        {entry.get('pass', '?')}: {changed}{'; ' + counts if counts else ''}")
                else:
                    lines.append(f"        {entry}")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"    {key}: {text}")
    return lines


def run(args: argparse.Namespace) -> int:
    model_map, description = describe(args.model)
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    lines = [f"{args.model}", model_map.summary(), "inputs:"]
    lines += _format_io(description["inputs"])
    lines.append("outputs:")
    lines += _format_io(description["outputs"])
    if description["metadata"]:
        lines.append("metadata:")
        lines += _format_metadata(description["metadata"])
    print("\n".join(lines))
    return 0
