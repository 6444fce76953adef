"""Token generation over a decode graph (KV cache in, KV cache out) under ONNX Runtime.

The decode graph (``pangu-light export --kv-cache``) maps

    input_ids [B, S], attention_mask [B, P + S], past_key_values.{i}.key/value [B, kv_i, P, d_i]
        -> logits [B, S, V], present.{i}.key/value [B, kv_i, P + S, d_i]

Positions are computed inside the graph from the mask (cumsum - 1), so a batch of prompts of
different lengths is LEFT-padded with ``pad_token_id`` and mask 0. The prefill runs the whole
padded batch with past tensors of length 0; each later step feeds one token per sequence and
the previous step's present tensors as the past. After pruning, layers may be fewer and
kv_i / d_i may differ per layer: they are read from the graph's input types, never from a
config.

The KV cache stays in ONNX Runtime OrtValues through IO binding (on the device of the session's
provider): only the token ids, the mask and the last position's logits cross into numpy.

The choice of the next token is a plug-in (``TokenSelector``: last-position logits [B, V] ->
token ids [B]); ``greedy_generate`` uses the arg-max. Sampling will plug in here.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import onnxruntime as ort

from pangu_light.runtime.errors import RuntimeUserError

__all__ = [
    "DecodeLayout",
    "GenerationResult",
    "KVLayer",
    "TokenSelector",
    "argmax_selector",
    "generate",
    "greedy_generate",
    "left_pad",
]

# last-position logits [batch, vocab] -> next token ids [batch] (int64)
TokenSelector = Callable[[np.ndarray], np.ndarray]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def argmax_selector(logits: np.ndarray) -> np.ndarray:
    """Greedy choice: the first index of the largest logit in each row."""
    return np.argmax(logits, axis=-1).astype(np.int64)


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

    @classmethod
    def from_session(cls, session: ort.InferenceSession) -> "DecodeLayout":
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
        for required, table, kind in (
            ("input_ids", inputs, "input"),
            ("attention_mask", inputs, "input"),
            ("logits", outputs, "output"),
        ):
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
                present = f"present.{index}.{kind}"
                if present not in outputs:
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
                    past_key=f"past_key_values.{index}.key",
                    past_value=f"past_key_values.{index}.value",
                    present_key=f"present.{index}.key",
                    present_value=f"present.{index}.value",
                    kv_heads=shape[1],
                    head_dim=shape[3],
                    dtype=dtype,
                )
            )
        vocab = outputs["logits"].shape[-1]
        return cls(layers=tuple(layers), vocab=vocab if isinstance(vocab, int) else None)

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


@dataclass
class GenerationResult:
    """New tokens per sequence (ending with the stop token that ended it, if any) and timings."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # graph runs after the prefill
    batch: int

    @property
    def new_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.tokens)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        """Token positions computed per second in the decode steps (batch x steps / time)."""
        return self.batch * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to one length: (input_ids [B, L], attention_mask [B, L]) as int64."""
    if not prompts:
        raise RuntimeUserError("no prompts to generate from: pass at least one prompt")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise RuntimeUserError(f"prompt {index} is empty: every prompt needs at least one token")
    length = max(len(prompt) for prompt in prompts)
    input_ids = np.full((len(prompts), length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = np.asarray(prompt, dtype=np.int64)
        attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


def _inference_session(session) -> tuple[ort.InferenceSession, str, int]:
    """Accept a ``SessionInfo`` (from ``create_session``) or a bare ``ort.InferenceSession``."""
    if isinstance(session, ort.InferenceSession):
        provider = session.get_providers()[0]
        device = {"CUDAExecutionProvider": "cuda", "CANNExecutionProvider": "cann"}.get(provider, "cpu")
        return session, device, 0
    inner = getattr(session, "session", None)
    if isinstance(inner, ort.InferenceSession):
        return inner, session.device_type, session.device_id
    raise TypeError(f"expected an onnxruntime InferenceSession or SessionInfo, got {type(session).__name__}")


class _BoundRunner:
    """Runs the decode graph with IO binding: present tensors stay OrtValues and become the
    next step's past without a round trip through numpy."""

    def __init__(self, session: ort.InferenceSession, layout: DecodeLayout, device: str, device_id: int):
        self.session = session
        self.layout = layout
        self.device = device
        self.device_id = device_id
        self.binding = session.io_binding()
        self.present_names = [present for _, present in layout.past_to_present()]
        self.past: dict[str, object] = {}
        self._keep: list[np.ndarray] = []

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict | None = None) -> np.ndarray:
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        # bind_cpu_input wraps the numpy buffer: keep the arrays alive until the run returns.
        self._keep = [np.ascontiguousarray(input_ids), np.ascontiguousarray(attention_mask)]
        binding.bind_cpu_input("input_ids", self._keep[0])
        binding.bind_cpu_input("attention_mask", self._keep[1])
        if past is not None:  # prefill: numpy arrays of length 0
            for name, array in past.items():
                self._keep.append(array)
                binding.bind_cpu_input(name, array)
        else:
            for past_name, present_name in self.layout.past_to_present():
                binding.bind_ortvalue_input(past_name, self.past[present_name])
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        self.past = dict(zip(self.present_names, values[1:]))
        return values[0].numpy()


class _NumpyRunner:
    """Plain ``session.run`` with numpy feeds (for comparison and as a fall-back)."""

    def __init__(self, session: ort.InferenceSession, layout: DecodeLayout):
        self.session = session
        self.layout = layout
        self.output_names = ["logits"] + [present for _, present in layout.past_to_present()]
        self.past: dict[str, np.ndarray] = {}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if past is not None:
            feeds.update(past)
        else:
            for past_name, present_name in self.layout.past_to_present():
                feeds[past_name] = self.past[present_name]
        values = self.session.run(self.output_names, feeds)
        self.past = dict(zip(self.output_names[1:], values[1:]))
        return values[0]


def generate(
    session,
    input_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    select: TokenSelector = argmax_selector,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int = 0,
    io_binding: bool = True,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt, choosing them with ``select``.

    A sequence ends at its first token in ``stop_tokens`` (which is kept in its output);
    finished sequences are fed ``pad_token_id`` until every sequence has ended or
    ``max_new_tokens`` is reached.
    """
    ort_session, device, device_id = _inference_session(session)
    layout = DecodeLayout.from_session(ort_session)
    if max_new_tokens < 0:
        raise RuntimeUserError(f"max_new_tokens must be 0 or more (got {max_new_tokens})")
    ids, mask = left_pad(input_ids, pad_token_id)
    batch = ids.shape[0]
    if layout.vocab is not None:
        out_of_range = [int(t) for t in ids[mask == 1] if not 0 <= t < layout.vocab]
        if out_of_range:
            raise RuntimeUserError(
                f"token id {out_of_range[0]} is outside the graph's vocabulary of {layout.vocab}: "
                "use the tokenizer that belongs to this model"
            )
    stops = np.asarray(sorted({int(t) for t in stop_tokens}), dtype=np.int64)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens == 0:
        return GenerationResult(outputs, 0.0, 0.0, 0, batch)

    runner = _BoundRunner(ort_session, layout, device, device_id) if io_binding else _NumpyRunner(ort_session, layout)
    finished = np.zeros(batch, dtype=bool)
    start = time.perf_counter()
    logits = runner.run(ids, mask, layout.empty_past(batch))
    prefill_seconds = time.perf_counter() - start
    steps = 0
    produced = 0  # tokens chosen per sequence so far (finished ones get pad, not counted)
    start = time.perf_counter()
    while True:
        chosen = np.asarray(select(logits[:, -1, :]), dtype=np.int64).reshape(batch)
        chosen = np.where(finished, pad_token_id, chosen)
        for row in np.flatnonzero(~finished):
            outputs[row].append(int(chosen[row]))
        finished |= np.isin(chosen, stops)
        produced += 1
        if finished.all() or produced >= max_new_tokens:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        logits = runner.run(chosen.reshape(batch, 1), mask)
        steps += 1
    decode_seconds = time.perf_counter() - start
    return GenerationResult(outputs, prefill_seconds, decode_seconds, steps, batch)


def greedy_generate(
    session,
    input_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Greedy (arg-max) generation: the new tokens of each prompt (see ``generate``)."""
    result = generate(
        session, input_ids, max_new_tokens, stop_tokens=stop_tokens, pad_token_id=pad_token_id
    )
    return result.tokens
