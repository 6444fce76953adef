"""Paths that one output file records of another (stats -> graph, plan -> graph, summaries).

A path typed on the command line is relative to the working directory of that run; written
as-is into a file, it breaks as soon as the file is read from anywhere else. A recorded path
is therefore stored relative to the folder of the file that records it (so a whole output
folder can be moved), with the absolute path beside it as the fallback (so a file that was
copied elsewhere on its own still finds what it names).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["record_path", "resolve_recorded_path"]


def record_path(target: str | os.PathLike, recorded_in: str | os.PathLike) -> dict[str, str]:
    """``{"relative": ..., "absolute": ...}`` for ``target`` as written into the file
    ``recorded_in`` (relative to that file's folder, POSIX separators)."""
    target = Path(target).resolve()
    folder = Path(recorded_in).resolve().parent
    return {"relative": Path(os.path.relpath(target, folder)).as_posix(), "absolute": str(target)}


def resolve_recorded_path(entry: str | dict | None, recorded_in: str | os.PathLike) -> Path | None:
    """The file a recorded entry names, read back from the file ``recorded_in``: the relative
    form if that exists, else the absolute one, else (nothing exists) the relative form
    resolved, so an error can name where it was looked for. A bare string (files written
    before paths were recorded this way) is tried relative to ``recorded_in``'s folder, then
    as given."""
    if not entry:
        return None
    folder = Path(recorded_in).resolve().parent
    if isinstance(entry, str):
        candidates = [folder / entry, Path(entry)]
    else:
        candidates = [folder / entry["relative"]] if entry.get("relative") else []
        candidates += [Path(entry["absolute"])] if entry.get("absolute") else []
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return candidates[0].resolve() if candidates else None
