"""Reading and writing graph files: one clear error for each way a file can be bad, atomic writes.

An output is written under a temporary name beside its final path and renamed over it
(``core.files``; a graph with an external-data file is staged as a pair in a temporary
directory and the data renamed into place first), so an interrupted or failed command never
leaves a partial file behind; an input is never overwritten by accident
(``refuse_overwrite_input``).

Imports: onnx, onnx_ir and ``pangu_light.core`` only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write

__all__ = ["load_model", "load_model_metadata", "save_model_atomic", "refuse_overwrite_input"]

# Graphs above this size keep their weights in a side file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


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


def save_model_atomic(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically; large models get an external-data side file."""
    path = Path(path)
    total_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total_bytes < _EXTERNAL_DATA_THRESHOLD_BYTES:
        with atomic_write(path) as temporary:
            ir.save(model, temporary)
        return path
    # The graph names its data file, so both are written under their final names into a
    # temporary directory beside the target and then renamed into place, data first.
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        ir.save(model, Path(staging) / path.name, external_data=data_name)
        os.replace(Path(staging) / data_name, path.parent / data_name)
        os.replace(Path(staging) / path.name, path)
    return path
