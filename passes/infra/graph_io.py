"""Reading and writing graph files: one clear error for each way a file can be bad, atomic writes.

An output is written under a temporary name beside its final path and renamed over it
(``core.files``; a graph with an external-data file is staged as a pair in a temporary
directory and the data renamed into place first), so an interrupted or failed command never
leaves a partial file behind; an input is never overwritten by accident
(``refuse_overwrite_input``).

Imports: onnx, onnx_ir and ``pangu_light.core`` only.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write

__all__ = [
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "THRESHOLD_ENV",
    "check_external_data",
    "data_files",
    "external_data_threshold",
    "load_model",
    "load_model_metadata",
    "refuse_overwrite_input",
    "save_model_atomic",
]

# Graphs above this size keep their weights in a side file: an embedded graph is built whole
# in memory as a protobuf (about three times its weights at the peak) and stops at 2 GiB.
EXTERNAL_DATA_THRESHOLD_BYTES = 64 * 1024 * 1024
THRESHOLD_ENV = "PANGU_LIGHT_EXTERNAL_DATA_BYTES"
_DATA_NAME = re.compile(r"\.[0-9a-f]{8}\.data")


def refuse_overwrite_input(output: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    out = Path(output).resolve()
    for path in inputs:
        if Path(path).resolve() == out:
            raise PanguLightError(
                f"output {output} is the same file as input {path}; inputs are never "
                "overwritten: choose another -o path"
            )


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx-ir, turning every way it can fail into one clear line.

    Weights in an external-data file are mapped, not read: a tensor is decoded only when a
    pass uses it, and saving copies the others file to file. Every external file is checked
    first (present, long enough), so a missing or truncated one is named at once."""
    path = Path(path)
    if not path.exists():
        raise PanguLightError(f"{path}: no such file; pass the path of an .onnx graph")
    if path.is_dir():
        raise PanguLightError(f"{path} is a directory; pass the path of an .onnx file inside it")
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf raises several unrelated types for a corrupt file
        raise PanguLightError(
            f"{path} is not a readable ONNX model ({type(error).__name__}: {error}); "
            "re-export it with `pangu-light export`"
        ) from None
    if len(model.graph) == 0:
        raise PanguLightError(
            f"{path} holds no graph nodes (empty or corrupt file); re-export it with `pangu-light export`"
        )
    check_external_data(model, path)
    return model


def check_external_data(model: ir.Model, path: str | os.PathLike) -> None:
    """Raise one clear line if a weights file the graph names is missing or too short."""
    needed: dict[Path, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            file = Path(tensor.base_dir) / tensor.location
            needed[file] = max(needed.get(file, 0), tensor.offset + (tensor.length or tensor.nbytes))
    for file, end in needed.items():
        if not file.is_file():
            raise PanguLightError(
                f"{path} keeps its weights in {file}, which is missing; keep the .onnx and its "
                "weights file together (copy both) or re-export the graph"
            )
        size = file.stat().st_size
        if size < end:
            raise PanguLightError(
                f"weights file {file} of {path} is truncated ({size} bytes, the graph needs {end}); "
                "re-export the graph or copy the file again"
            )


def load_model_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The graph's metadata_props, read without its weights."""
    path = Path(path)
    if not path.is_file():
        raise PanguLightError(f"{path}: no such file; pass the path of an .onnx graph")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises several unrelated types for a corrupt file
        raise PanguLightError(f"{path} is not a readable ONNX model ({type(error).__name__}); re-export it") from None
    return {p.key: p.value for p in proto.metadata_props}


def save_model_atomic(model: ir.Model, path: str | os.PathLike, *, external: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically, its weights in a side file when ``external``
    (default: when they exceed ``EXTERNAL_DATA_THRESHOLD_BYTES``).

    The side file is ``<name>.<random>.data``, a name no earlier write used: both files are
    written into a temporary directory beside the target, the data is renamed into place, then
    the graph (the rename that publishes the pair), and only then are data files of earlier
    writes to the same path removed. A reader, or an interrupted write, sees the old pair or the
    new one, never a graph next to another graph's weights. Weights that are mapped from an
    input file are copied file to file, one tensor at a time."""
    path = Path(path)
    if external is None:
        total_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        external = total_bytes >= external_data_threshold()
    if not external:
        with atomic_write(path) as temporary, _weights_in_memory(model):
            ir.save(model, temporary)
        _remove_stale_data(path, keep=None)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".partial", dir=path.parent) as staging:
        data_name = f"{path.name}.{secrets.token_hex(4)}.data"
        ir.save(model, Path(staging) / path.name, external_data=data_name)
        os.replace(Path(staging) / data_name, path.parent / data_name)
        os.replace(Path(staging) / path.name, path)
    _remove_stale_data(path, keep=data_name)
    return path


@contextlib.contextmanager
def _weights_in_memory(model: ir.Model) -> Iterator[None]:
    """Read weights mapped from another file while an embedded graph is written (``ir.save``
    would otherwise keep references to that file), then put the mapped tensors back."""
    mapped = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    originals = [v.const_value for v in mapped]
    for value, tensor in zip(mapped, originals):
        value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    try:
        yield
    finally:
        for value, tensor in zip(mapped, originals):
            value.const_value = tensor


def external_data_threshold() -> int:
    """Weight bytes from which graphs are written with a side file: ``$PANGU_LIGHT_EXTERNAL_DATA_BYTES``
    if set, else ``EXTERNAL_DATA_THRESHOLD_BYTES``."""
    value = os.environ.get(THRESHOLD_ENV)
    if value is None:
        return EXTERNAL_DATA_THRESHOLD_BYTES
    try:
        return int(value)
    except ValueError:
        raise PanguLightError(f"${THRESHOLD_ENV}={value!r} is not a number of bytes; unset it or give e.g. 0") from None


def data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files ``save_model_atomic`` wrote for ``path`` (any write)."""
    path = Path(path)
    candidates = path.parent.glob(f"{glob.escape(path.name)}.*.data")
    return sorted(p for p in candidates if _DATA_NAME.fullmatch(p.name[len(path.name):]))


def _remove_stale_data(path: Path, keep: str | None) -> None:
    for stale in data_files(path):
        if stale.name != keep:
            stale.unlink(missing_ok=True)
