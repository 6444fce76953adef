"""reports.table.format_table: columns padded to their widest cell, alignment per column."""

from __future__ import annotations

import pytest

from pangu_light.reports.table import format_table


def test_columns_are_padded_and_aligned():
    text = format_table([["graph", "ms", "x"], ["original.onnx", "12.5", "1.00"], ["p.onnx", "7.25", "1.72"]])
    assert text.splitlines() == [
        "graph            ms     x",
        "original.onnx  12.5  1.00",
        "p.onnx         7.25  1.72",
    ]
    assert format_table([["a", "bb"], ["ccc", "d"]], align="rl", gap=" ").splitlines() == ["  a bb", "ccc d"]
    assert format_table([]) == ""


def test_a_bad_alignment_is_refused():
    with pytest.raises(ValueError, match="one letter"):
        format_table([["a", "b"]], align="lx")
