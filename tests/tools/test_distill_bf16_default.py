"""distill/recover's bfloat16 default: forced by --bf16 / --no-bf16, otherwise on only where bfloat16
matmuls measure at least as fast as float32 (a CPU without native bfloat16 emulates them)."""

from __future__ import annotations

import argparse

import pytest
import torch

from pangu_light.frontend.distill import objective
from pangu_light.tools.distill_options import add_distill_arguments, resolve_bf16


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    return parser.parse_args(["--teacher", "teacher", "-o", "out", *argv])


def test_flags_force_the_choice_and_the_default_is_left_to_the_machine():
    assert parsed("--bf16").bf16 is True
    assert parsed("--no-bf16").bf16 is False
    assert parsed().bf16 is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU bfloat16 is always the default")
@pytest.mark.parametrize("speedup, expected", [(0.05, False), (0.99, False), (1.0, True), (3.0, True)])
def test_the_default_follows_the_measured_speedup(monkeypatch, capsys, speedup, expected):
    monkeypatch.setattr(objective, "bf16_speedup", lambda: speedup)
    assert resolve_bf16() is expected
    said = capsys.readouterr().err
    assert ("emulated" in said and "--bf16" in said) is (not expected)


def test_the_measurement_is_a_positive_ratio():
    assert objective.bf16_speedup(size=64, repeats=1) > 0
