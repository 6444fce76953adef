"""benchmarks/recover_curves.py reports each run's matmul precision from its summary (the runs are
--quiet, so distill's one line saying it chose float32 is not printed) and --precision forces it."""

from __future__ import annotations

import argparse
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


@pytest.mark.parametrize("precision, bf16", [("auto", None), ("float32", False), ("bfloat16", True)])
def test_the_precision_option_forces_distills_choice(script, precision, bf16):
    from pangu_light.tools.distill_options import add_distill_arguments

    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    args = parser.parse_args(["--teacher", "t", "-o", "out", *script.PRECISION_FLAGS[precision]])
    assert args.bf16 is bf16
