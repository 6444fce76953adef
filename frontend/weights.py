"""Weights attached to an exported graph straight from the checkpoint's safetensors files.

The graph's structure does not depend on the weight values, so the export traces a model whose
parameters are never read (``empty_model``: uninitialised storage that is never touched, so it
costs no resident memory) and then points every initializer at its bytes in the safetensors
file, by ``state_dict`` name::

    model.safetensors = [u64 n][JSON header, n bytes][data ...]
    header[name] = {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}
    initializer(name) := ExternalTensor(file, offset = 8 + n + begin, length = end - begin)

An ``onnx_ir.ExternalTensor`` maps the file and reads a tensor only when it is used, so saving
the graph copies the weights file to file, one tensor at a time, and nothing holds a second
copy. A tied weight (``lm_head.weight`` = ``model.embed_tokens.weight``) is found under any of
its names. Where the file's dtype differs from the export's, the tensor is converted lazily
(one tensor in memory at a time).

``attach_weights`` takes any ``TensorSource`` (``random_models`` generates tensors instead);
it returns False, leaving the graph as it is, when a name is missing from the files (a
checkpoint that transformers renames on load, a ``.bin`` checkpoint): the caller then
loads the model for real.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError

__all__ = [
    "StoredTensor", "TensorSource", "attach_weights", "empty_model", "safetensors_index", "safetensors_source",
]

_DTYPES = {
    "F32": ir.DataType.FLOAT,
    "F16": ir.DataType.FLOAT16,
    "BF16": ir.DataType.BFLOAT16,
    "F64": ir.DataType.DOUBLE,
    "I64": ir.DataType.INT64,
    "I32": ir.DataType.INT32,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""

    file: Path
    offset: int
    length: int
    dtype: ir.DataType
    shape: tuple[int, ...]


def safetensors_index(model_dir: Path) -> dict[str, StoredTensor] | None:
    """Every tensor of the checkpoint in ``model_dir`` by name, or None without safetensors."""
    model_dir = Path(model_dir)
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    index: dict[str, StoredTensor] = {}
    for name in files:
        path = model_dir / name
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        size = path.stat().st_size
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(entry["dtype"])
            begin, end = entry["data_offsets"]
            if dtype is None:
                return None
            if 8 + header_length + end > size:
                raise PanguLightError(
                    f"{path} is truncated ({size} bytes, tensor {key} ends at {8 + header_length + end}); "
                    "download or convert the model again"
                )
            index[key] = StoredTensor(path, 8 + header_length + begin, end - begin, dtype, tuple(entry["shape"]))
    return index


def empty_model(config, dtype: str = "float32"):
    """The Hugging Face model of ``config`` with uninitialised, never-touched parameters.

    Parameters are created on the meta device (no memory, no random initialisation), then given
    uninitialised CPU storage, which the kernel backs with memory only when written; tracing
    never writes it. Buffers (rotary frequencies, embedding scales) are computed for real by
    the modules' constructors and kept, since the export folds them into constants."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage, tied ones included
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return model.eval()


# (state_dict names of one tensor, shape, dtype) -> its tensor, or None when not available
TensorSource = Callable[[list[str], tuple[int, ...], ir.DataType], "ir.TensorProtocol | None"]


def safetensors_source(index: dict[str, StoredTensor]) -> TensorSource:
    """Tensors mapped from the checkpoint files in ``index`` (by any of their names)."""

    def tensor(names: list[str], shape: tuple[int, ...], dtype: ir.DataType):
        stored = next((index[n] for n in names if n in index), None)
        if stored is None or stored.shape != shape:
            return None
        return _tensor(names[0], stored, dtype)

    return tensor


def attach_weights(model: ir.Model, source: TensorSource, aliases: dict[str, list[str]]) -> bool:
    """Give every initializer named in ``aliases`` (graph name -> all state_dict names of that
    tensor) its tensor from ``source``; False (nothing changed) if any is not available."""
    found = {}
    for name, names in aliases.items():
        value = model.graph.initializers.get(name)
        if value is None:
            continue
        tensor = source(names, tuple(value.shape.numpy()), value.dtype)
        if tensor is None:
            return False
        found[name] = tensor
    for name, tensor in found.items():
        model.graph.initializers[name].const_value = tensor
    return True


def _tensor(name: str, stored: StoredTensor, dtype: ir.DataType) -> ir.TensorProtocol:
    external = ir.ExternalTensor(
        stored.file.name,
        stored.offset,
        stored.length,
        stored.dtype,
        shape=ir.Shape(stored.shape),
        name=name,
        base_dir=stored.file.parent,
    )
    if stored.dtype == dtype:
        return external

    def convert() -> ir.Tensor:
        array = external.numpy()
        if stored.dtype == ir.DataType.BFLOAT16:
            array = array.astype(np.float32)
        return ir.tensor(array.astype(dtype.numpy()), name=name)

    return ir.LazyTensor(convert, dtype=dtype, shape=ir.Shape(stored.shape), name=name)
