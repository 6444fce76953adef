"""The cache layout of a decode graph, read from its ONNX Runtime session: per layer the past and
present tensor names, KV heads and head size (pruned graphs may differ per layer), and the
zero-length past tensors a prefill is fed.

A deployment graph (``pangu-light deploy``) records in its metadata (``DEPLOY_METADATA_KEY``,
JSON) how its cache is fed: ``io_kind`` ``gqa-shared-buffer`` means past and present may be one
buffer of fixed capacity (at most ``max_length`` positions, the rotary cache's length).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from pangu_light.core import contract
from pangu_light.runtime.errors import RuntimeUserError

__all__ = ["DEPLOY_METADATA_KEY", "SHARED_BUFFER_IO", "DecodeLayout", "KVLayer"]

# The same strings as deploy.build.DEPLOY_KEY and passes.deploy.fuse_gqa.IO_KIND_GQA (the runtime
# imports neither; tests/deploy/test_deploy_fused.py checks they agree).
DEPLOY_METADATA_KEY = "pangu_light.deploy"
SHARED_BUFFER_IO = "gqa-shared-buffer"

_PAST = re.compile(rf"^{re.escape(contract.PAST_PREFIX)}(\d+)\.(key|value)$")
_NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


@dataclass(frozen=True)
class KVLayer:
    """One layer's cache tensors as the graph declares them."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str
    kv_heads: int
    head_dim: int
    dtype: type


@dataclass(frozen=True)
class DecodeLayout:
    """The names and per-layer cache shapes of a decode graph, read from the session."""

    layers: tuple[KVLayer, ...]
    vocab: int | None
    logits_dtype: type = np.float32
    shared_buffer: bool = False  # past and present may alias one buffer (deployment GQA graphs)
    max_length: int = 0  # positions the graph can hold (its rotary cache); 0: not bounded here
    padding_bias: bool = True  # False: a deployment graph without GQA's padding bias (no padded batches)

    @classmethod
    def from_session(cls, session: ort.InferenceSession, *, require_outputs: bool = True) -> DecodeLayout:
        """Read and check the layout; ``require_outputs=False`` reads only the inputs, for a graph
        whose outputs were replaced (calibration taps) and that is fed an empty past only."""
        inputs = {arg.name: arg for arg in session.get_inputs()}
        outputs = {arg.name: arg for arg in session.get_outputs()}
        past = {}
        for name in inputs:
            match = _PAST.match(name)
            if match:
                past[(int(match.group(1)), match.group(2))] = inputs[name]
        if not past:
            raise RuntimeUserError(
                "the graph has no past_key_values.* inputs (a no-cache graph), so it cannot decode "
                "token by token: export it with `pangu-light export --kv-cache`"
            )
        required_names = [(contract.INPUT_IDS, inputs, "input"), (contract.ATTENTION_MASK, inputs, "input")]
        if require_outputs:
            required_names.append((contract.LOGITS, outputs, "output"))
        for required, table, kind in required_names:
            if required not in table:
                raise RuntimeUserError(
                    f"the decode graph has no {kind} {required!r}: use a graph written by "
                    "`pangu-light export --kv-cache` (or compiled from one)"
                )
        layers = []
        for index in sorted({layer for layer, _ in past}):
            names = {}
            for kind in ("key", "value"):
                if (index, kind) not in past:
                    raise RuntimeUserError(
                        f"the decode graph has past_key_values.{index} without its {kind}: the "
                        "graph is damaged; re-export it with `pangu-light export --kv-cache`"
                    )
                present = contract.present_key(index) if kind == "key" else contract.present_value(index)
                if require_outputs and present not in outputs:
                    raise RuntimeUserError(
                        f"the decode graph has no output {present!r} for input "
                        f"past_key_values.{index}.{kind}: re-export it with `pangu-light export --kv-cache`"
                    )
                names[kind] = past[(index, kind)]
            shape = names["key"].shape
            if len(shape) != 4 or not all(isinstance(dim, int) for dim in (shape[1], shape[3])):
                raise RuntimeUserError(
                    f"past_key_values.{index}.key has shape {shape}, not [batch, kv_heads, "
                    "past_sequence, head_dim] with fixed kv_heads and head_dim: re-export the graph"
                )
            value_shape = names["value"].shape
            if len(value_shape) != 4 or value_shape[1] != shape[1]:
                raise RuntimeUserError(
                    f"past_key_values.{index}.value has shape {value_shape}, which does not match "
                    f"the key's {shape}: re-export the graph"
                )
            dtype = _NUMPY_DTYPES.get(names["key"].type)
            if dtype is None:
                raise RuntimeUserError(
                    f"past_key_values.{index}.key has element type {names['key'].type}; the runtime "
                    f"handles {', '.join(_NUMPY_DTYPES)}: export in float32"
                )
            layers.append(
                KVLayer(
                    past_key=contract.past_key(index),
                    past_value=contract.past_value(index),
                    present_key=contract.present_key(index),
                    present_value=contract.present_value(index),
                    kv_heads=shape[1],
                    head_dim=shape[3],
                    dtype=dtype,
                )
            )
        logits = outputs.get(contract.LOGITS)
        vocab = logits.shape[-1] if logits is not None else None
        deployed = _deploy_record(session)
        return cls(
            layers=tuple(layers),
            vocab=vocab if isinstance(vocab, int) else None,
            logits_dtype=_NUMPY_DTYPES.get(logits.type, np.float32) if logits is not None else np.float32,
            shared_buffer=deployed.get("io_kind") == SHARED_BUFFER_IO,
            max_length=int(deployed.get("max_length") or 0),
            padding_bias=bool(deployed.get("padding_bias", True)),
        )

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors [batch, kv_i, 0, d_i] for the prefill."""
        past = {}
        for layer in self.layers:
            empty = np.zeros((batch, layer.kv_heads, 0, layer.head_dim), dtype=layer.dtype)
            past[layer.past_key] = empty
            past[layer.past_value] = empty
        return past

    def past_to_present(self) -> list[tuple[str, str]]:
        pairs = []
        for layer in self.layers:
            pairs.append((layer.past_key, layer.present_key))
            pairs.append((layer.past_value, layer.present_value))
        return pairs


def _deploy_record(session: ort.InferenceSession) -> dict:
    """The deploy record in the graph's metadata ({} for a graph that is not a deployment)."""
    raw = session.get_modelmeta().custom_metadata_map.get(DEPLOY_METADATA_KEY)
    try:
        record = json.loads(raw) if raw else {}
    except ValueError:
        raise RuntimeUserError(
            f"the graph's {DEPLOY_METADATA_KEY} metadata is not JSON: rebuild it with `pangu-light deploy`"
        ) from None
    return record if isinstance(record, dict) else {}
