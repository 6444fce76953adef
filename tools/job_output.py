"""What commands that run a whole job into one output folder share (prune, search): the folder
checked and created, timed progress notes, and an export that a re-run reuses."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError

__all__ = ["export_kinds", "export_once", "job_notes", "output_directory"]


def output_directory(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise PanguLightError(f"{out} exists and is not a directory; pass a directory for -o")
    out.mkdir(parents=True, exist_ok=True)
    return out


def job_notes(quiet: bool) -> Callable[[str], None]:
    """``note(message)``: one stderr line with the seconds since this call, unless ``quiet``."""
    start = time.perf_counter()

    def note(message: str) -> None:
        if not quiet:
            print(f"... {message} [{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)

    return note


def export_once(model: str, path: Path, *, kv_cache: bool, note: Callable[[str], None]) -> Path:
    """``path``, exported from ``model`` unless a graph exported from the same model is there."""
    return export_kinds(model, {kv_cache: path}, note=note)[kv_cache]


def export_kinds(model: str, paths: dict[bool, Path], *, note: Callable[[str], None]) -> dict[bool, Path]:
    """``paths`` (``{kv_cache: path}``), each exported from ``model`` unless a graph exported
    from the same model is there; the missing kinds are exported in one run (the model is
    resolved and checked once: ``export_stage.export_graphs``)."""
    from pangu_light.frontend.export_stage import export_graphs
    from pangu_light.passes.infra.graph_io import load_model_metadata

    missing = {}
    for kv_cache, path in paths.items():
        if path.is_file() and load_model_metadata(path).get(contract.SOURCE_MODEL) == str(model):
            note(f"reusing {path} (exported from {model})")
        else:
            missing[kv_cache] = path
    if missing:
        note(f"exporting {model} -> {', '.join(str(p) for p in missing.values())}")
        export_graphs(model, missing, progress=note)
    return dict(paths)
