"""The plan's JSON text, written for people: one line per short list of numbers, so long
index lists stay readable and a changed plan diffs line by line."""

from __future__ import annotations

import json
import math
from typing import Any

from pangu_light.core.errors import PanguLightError

__all__ = ["readable_json"]


def readable_json(data: Any, indent: int = 0) -> str:
    """JSON with one line per list of numbers: long index lists stay readable and diffable."""
    pad = "  " * indent
    if isinstance(data, dict):
        if not data:
            return "{}"
        items = [f'{pad}  {json.dumps(k)}: {readable_json(v, indent + 1)}' for k, v in data.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data) and not all(
        isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v) and len(v) <= 4 for v in data
    ):
        items = [f"{pad}  {readable_json(v, indent + 1)}" for v in data]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    if isinstance(data, float) and not math.isfinite(data):
        raise PanguLightError(f"plan value {data} is not a finite number")
    return json.dumps(data)
