"""Writing files so that an interrupted or failed write never leaves a partial output behind.

Every output is written under a hidden temporary name beside its final path (same directory,
so the rename cannot cross file systems) and renamed over the final path only once the write
has finished; on an exception the temporary is removed. Readers therefore see the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_directory", "write_text", "write_json", "share_permissions"]


@contextlib.contextmanager
def atomic_write(final_path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only on success.

    ``suffix`` ends the temporary name, for writers that choose a format by extension
    (``.npz``, ``.png``). The temporary file exists (empty) when the block starts.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".partial{suffix}", dir=final.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        _give_usual_mode(temporary)
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final_path``; on success it replaces
    ``final_path`` (an existing directory there is removed first), on failure it is removed."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield temporary
        share_permissions(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def share_permissions(directory: str | os.PathLike) -> None:
    """Give a directory and the files in it the usual modes (``mkstemp``/``mkdtemp`` and some
    writers create them private)."""
    directory = Path(directory)
    os.chmod(directory, 0o777 & ~_umask())
    for path in directory.iterdir():
        if path.is_file():
            _give_usual_mode(path)


def _give_usual_mode(path: Path) -> None:
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
