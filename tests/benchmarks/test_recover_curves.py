"""benchmarks/recover_curves.py reports each run's matmul precision from its summary (the runs are
--quiet, so distill's one line saying it chose float32 is not printed) and --precision forces it."""

from __future__ import annotations

import argparse

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("recover_curves")


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
