"""distill/recover's bfloat16 default: forced by --bf16 / --no-bf16, otherwise on only where the CPU
has bfloat16 instructions (a CPU without them emulates bfloat16 matmuls, tens of times slower)."""

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
@pytest.mark.parametrize("native", [False, True])
def test_the_default_follows_the_cpu(monkeypatch, capsys, native):
    monkeypatch.setattr(objective, "cpu_has_native_bf16", lambda: native)
    assert resolve_bf16() is native
    said = capsys.readouterr().err
    assert ("no bfloat16 instructions" in said and "--bf16" in said) is (not native)
    assert resolve_bf16(quiet=True) is native and capsys.readouterr().err == ""


def test_the_cpu_answer_is_stable():
    """The same answer every time: two runs on one machine (or a resumed run) never differ."""
    assert len({objective.cpu_has_native_bf16() for _ in range(5)}) == 1
