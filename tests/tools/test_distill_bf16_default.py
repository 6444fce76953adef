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
    assert objective.bf16_speedup(rows=8, inner=16, cols=32, pairs=1) > 0


def test_one_disturbed_pair_does_not_decide(monkeypatch):
    """Pairs timed back to back, then the median: bfloat16 twice as fast in four pairs, and one pair
    where the float32 timing was preempted (100x) or the bfloat16 one was (x100) changes nothing."""
    for outlier in ((0.1, 0.0005), (0.001, 0.05)):
        timings = iter([(0.003, 0.003)] + [(0.001, 0.0005)] * 2 + [outlier] + [(0.001, 0.0005)] * 2)
        pair = []

        def fake(a, b, bf16):
            if not bf16:
                pair[:] = next(timings)
            return pair[1] if bf16 else pair[0]

        monkeypatch.setattr(objective, "_matmul_seconds", fake)
        assert objective.bf16_speedup(pairs=5) == pytest.approx(2.0)
