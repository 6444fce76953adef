"""Reading what a compiled graph's metadata says about the passes that made it.

The pass manager appends one record per pass run to ``contract.PASS_STATS`` (a JSON list of
``{"pass", "modified", "stats"}``); drop-layers also writes ``contract.LAYER_ORIGINS``, the
original index of each layer it kept. Readers here never raise on a malformed entry: a graph
written by another tool simply has no records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pangu_light.core import contract

__all__ = ["pass_records", "layer_origins"]


def pass_records(metadata: Mapping[str, str]) -> list[dict[str, Any]]:
    """The pass records in ``metadata`` (oldest first); ``[]`` when absent or malformed."""
    raw = metadata.get(contract.PASS_STATS)
    if not raw:
        return []
    try:
        records = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def layer_origins(metadata: Mapping[str, str]) -> list[int] | None:
    """The original index of each layer of the graph, or None when no layer was ever dropped
    (then layer i is the original layer i)."""
    raw = metadata.get(contract.LAYER_ORIGINS)
    if not raw:
        return None
    try:
        origins = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(origins, list) or not all(isinstance(i, int) for i in origins):
        return None
    return origins
