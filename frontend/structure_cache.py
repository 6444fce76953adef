"""Traced graph structures kept between runs: an architecture is traced once per graph kind.

Tracing is nearly all of an export's time (two symbolic traces by torch.export, a minute or
more each for a 30-layer model on two cores), and its result depends only on the model's
config, the graph kind and the exporter, never on the weight values. So after a trace the
cleaned graph is stored without its weights (each parameter initializer is a reference into
the checkpoint's safetensors, 0 bytes in the file) under a key of everything that shapes it (the dtype too)::

    <cache>/structures/<sha256(config json, kind, opset, exporter sources, library versions)[:20]>/
        no-cache.onnx | decode.onnx

and a later export of any checkpoint with that config loads it and points the parameters at
its own safetensors (``weights.attach_weights``). Files are written atomically; a damaged one
is ignored (traced again). Delete ``<cache>/structures`` to clear it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx_ir as ir

from pangu_light.core.cache import default_cache_dir
from pangu_light.core.files import atomic_write

__all__ = ["structure_key", "load_structure", "store_structure"]

_SOURCES = ("export.py", "weights.py", "structure_cache.py")


def structure_key(config_json: str, kv_cache: bool, opset: int, dtype: str = "float32") -> str:
    import onnx_ir
    import onnxscript
    import torch
    import transformers

    config = json.loads(config_json)
    config.pop("_name_or_path", None)  # where it was read from does not shape the graph
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(f"{kv_cache} {opset} {dtype}".encode())
    for name in _SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    versions = (torch.__version__, transformers.__version__, onnxscript.__version__, onnx_ir.__version__)
    digest.update(" ".join(versions).encode())
    return digest.hexdigest()[:20]


def _path(key: str, kv_cache: bool, cache_dir: Path | None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "structures" / key / ("decode.onnx" if kv_cache else "no-cache.onnx")


def load_structure(key: str, kv_cache: bool, cache_dir: Path | None = None) -> ir.Model | None:
    """The stored structure (parameters still to be attached), or None."""
    path = _path(key, kv_cache, cache_dir)
    if not path.is_file():
        return None
    try:
        return ir.load(path)
    except Exception:  # a damaged entry is traced again, never trusted
        return None


def store_structure(model: ir.Model, key: str, kv_cache: bool, parameters, cache_dir: Path | None = None) -> None:
    """Store ``model`` without the values of the initializers named in ``parameters``: each is
    written as a reference to a file that does not exist (``weights.attach_weights`` replaces it
    on load), so nothing of the weights is read or copied."""
    path = _path(key, kv_cache, cache_dir)
    saved = {}
    for name in parameters:
        value = model.graph.initializers.get(name)
        if value is not None and value.const_value is not None:
            saved[name] = value.const_value
            value.const_value = ir.ExternalTensor(
                "weights-not-stored", 0, saved[name].nbytes, saved[name].dtype, shape=saved[name].shape, name=name
            )
    try:
        with atomic_write(path) as temporary:
            ir.save(model, temporary)
    finally:
        for name, tensor in saved.items():
            model.graph.initializers[name].const_value = tensor
