"""benchmarks/recover_curves.py reports each run's matmul precision from its summary (the runs are
--quiet, so distill's one line saying it chose float32 is not printed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("recover_curves", BENCHMARKS / "recover_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("summary, expected", [
    ({"fingerprint": {"bf16": False}}, "float32"),
    ({"fingerprint": {"bf16": True}}, "bfloat16"),
    ({}, "unknown"),
    ({"fingerprint": {}}, "unknown"),
])
def test_the_precision_comes_from_the_fingerprint(script, summary, expected):
    assert script.matmul_precision(summary) == expected
