"""An export does not depend on the process: Python shuffles string hashes per process
(PYTHONHASHSEED), and Gemma3's forward iterates ``set(config.layer_types)``, so before
``export._layer_types_in_sorted_order`` two processes could order and name the rotary nodes
differently (the structure cache then disagreed with a fresh trace). Two processes whose hash
seeds order those layer types differently must export the same nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
LAYER_TYPES = "print(list({'sliding_attention', 'full_attention'}))"
EXPORT = f"""
import json, sys
sys.path.insert(0, {str(TESTS)!r})
from families import tiny_model
from pangu_light.frontend.export import ExportOptions, export_model
model = export_model(tiny_model("gemma3"), ExportOptions(kv_cache=False))
print(json.dumps([[n.name, n.op_type, [v.name if v is not None else "" for v in n.inputs]] for n in model.graph]))
"""


def _env(seed: int) -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": str(seed)}


def _seeds_with_different_set_orders() -> tuple[int, int]:
    orders = {}
    for seed in range(64):
        order = subprocess.run([sys.executable, "-c", LAYER_TYPES], env=_env(seed), capture_output=True,
                               text=True, check=True).stdout
        orders.setdefault(order, seed)
        if len(orders) == 2:
            return tuple(orders.values())
    pytest.fail("no two hash seeds of 64 ordered the two layer types differently")


@pytest.mark.slow
def test_gemma3_export_is_the_same_under_any_hash_seed():
    first, second = _seeds_with_different_set_orders()
    runs = [subprocess.Popen([sys.executable, "-c", EXPORT], env=_env(seed), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (first, second)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-2000:]
    nodes = [json.loads(out) for out, _ in outputs]
    assert len(nodes[0]) > 100 and nodes[0] == nodes[1]
