"""Width-padded text tables: each column as wide as its widest cell."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence[object]], *, align: str | None = None, gap: str = "  ") -> str:
    """``rows`` (the header first, if any) as lines of padded cells joined by ``gap``, trailing
    spaces removed. ``align`` has one letter per column, ``l`` or ``r``; by default the first
    column (labels) is left-aligned and the others (numbers) right-aligned. Cells are written
    with ``str``: format numbers before passing them."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        return ""
    columns = max(map(len, cells))
    align = align or "l" + "r" * (columns - 1)
    if len(align) != columns or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} needs one letter l or r for each of the {columns} columns")
    widths = [max(len(row[c]) for row in cells if c < len(row)) for c in range(columns)]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(width) if side == "r" else cell.ljust(width)
            for cell, width, side in zip(row, widths, align)
        ]
        lines.append(gap.join(padded).rstrip())
    return "\n".join(lines)
