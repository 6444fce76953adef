"""Reading and writing graphs for the CLI: clear errors for bad files, atomic writes.

An output is first written next to its final path under a temporary name and then renamed
over it, so an interrupted or failed command never leaves a partial file behind, and an
input is never overwritten by accident (``refuse_overwrite_input``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError

__all__ = ["atomic_path", "load_model", "save_model_atomic", "refuse_overwrite_input"]

# Graphs above this size keep their weights in a side file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only on success."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def refuse_overwrite_input(output: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    out = Path(output).resolve()
    for path in inputs:
        if Path(path).resolve() == out:
            raise PanguLightError(
                f"output {output} is the same file as input {path}; inputs are never "
                "overwritten: choose another -o path"
            )


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx-ir, turning every way it can fail into one clear line."""
    path = Path(path)
    if not path.exists():
        raise PanguLightError(f"{path}: no such file; pass the path of an .onnx graph")
    if path.is_dir():
        raise PanguLightError(f"{path} is a directory; pass the path of an .onnx file inside it")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as error:  # protobuf raises several unrelated types for a corrupt file
        raise PanguLightError(
            f"{path} is not a readable ONNX model ({type(error).__name__}: {error}); "
            "re-export it with `pangu-light export`"
        ) from None
    if len(proto.graph.node) == 0:
        raise PanguLightError(
            f"{path} holds no graph nodes (empty or corrupt file); re-export it with `pangu-light export`"
        )
    return ir.serde.deserialize_model(proto)


def save_model_atomic(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically; large models get an external-data side file."""
    path = Path(path)
    total_bytes = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    if total_bytes < _EXTERNAL_DATA_THRESHOLD_BYTES:
        with atomic_path(path) as tmp:
            ir.save(model, tmp)
        return path
    # The graph names its data file, so both are written under their final names into a
    # temporary directory beside the target and then renamed into place, data first.
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        tmp_model = Path(tmp_dir) / path.name
        ir.save(model, tmp_model, external_data=data_name)
        os.replace(Path(tmp_dir) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return path
