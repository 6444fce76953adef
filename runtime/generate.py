"""Token generation over a decode graph (KV cache in, KV cache out) under ONNX Runtime.

The decode graph (``pangu-light export --kv-cache``) maps

    input_ids [B, S], attention_mask [B, P + S], past_key_values.{i}.key/value [B, kv_i, P, d_i]
        -> logits [B, S, V], present.{i}.key/value [B, kv_i, P + S, d_i]

Positions are computed inside the graph from the mask (cumsum - 1), so a batch of prompts of
different lengths is LEFT-padded with ``pad_token_id`` and mask 0. The prefill runs the whole
padded batch with past tensors of length 0; each later step feeds one token per sequence and
the previous step's present tensors as the past. After pruning, layers may be fewer and
kv_i / d_i may differ per layer: they are read from the graph's input types, never from a
config (``runtime.layout.DecodeLayout``).

The KV cache lives in buffers allocated once per generation on the device of the session's
provider, sized for prompt + max_new_tokens - 1 positions, two per cache tensor: each step
binds (IO binding) its past to one and its present to the other, then they swap. A deployment
graph whose attention is GroupQueryAttention (``pangu-light deploy``; its metadata says
``gqa-shared-buffer``) gets one buffer per cache tensor, bound as past and present at once, and
writes each step's positions in place (``runtime.kv_runners``). Nothing is allocated per step
and the cache never crosses into numpy: only the token ids, the mask and the last position's
logits do.

The choice of the next token is a plug-in from ``runtime.sampling``: ``argmax_selector``
(greedy, the default) or ``Sampling(temperature, top_k, top_p, seed)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.kv_runners import BoundRunner, NumpyRunner, SharedRunner
from pangu_light.runtime.layout import DecodeLayout
from pangu_light.runtime.sampling import Sampling, TokenSelector, argmax_selector

__all__ = ["GenerationResult", "generate", "greedy_generate", "left_pad"]


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


def generate(
    session,
    input_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    select: TokenSelector | Sampling = argmax_selector,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int = 0,
    io_binding: bool = True,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt, choosing them with ``select``.

    ``select`` is a ``TokenSelector`` (default: arg-max, greedy) or a ``Sampling`` (a fresh
    seeded selector is made for this call, so the same seed gives the same tokens).
    A sequence ends at its first token in ``stop_tokens`` (which is kept in its output);
    finished sequences are fed ``pad_token_id`` until every sequence has ended or
    ``max_new_tokens`` is reached. ``io_binding=False`` runs the plain numpy loop instead of
    the pre-allocated, bound one (same tokens; for comparison).
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
    if isinstance(select, Sampling):
        select = select.selector(batch)
    stops = np.asarray(sorted({int(t) for t in stop_tokens}), dtype=np.int64)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens == 0:
        return GenerationResult(outputs, 0.0, 0.0, 0, batch)

    if not layout.padding_bias and not mask.all():
        raise RuntimeUserError(
            "this deployment graph was built with --no-padding-bias, so it cannot mask padding, and "
            "these prompts differ in length: give prompts of one length, or deploy without --no-padding-bias"
        )
    capacity = ids.shape[1] + max_new_tokens - 1  # the last chosen token is never fed
    if io_binding and layout.shared_buffer:
        runner = SharedRunner(ort_session, layout, device, device_id, batch, capacity)
    elif io_binding:
        runner = BoundRunner(ort_session, layout, device, device_id, batch, capacity)
    else:
        runner = NumpyRunner(ort_session, layout, batch)
    # The mask grows by one column of ones per step: kept in one buffer, fed as a prefix.
    full_mask = np.ones((batch, ids.shape[1] + max_new_tokens), dtype=np.int64)
    full_mask[:, : ids.shape[1]] = mask
    length = ids.shape[1]
    finished = np.zeros(batch, dtype=bool)
    start = time.perf_counter()
    logits = runner.run(ids, full_mask[:, :length])
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
        length += 1
        logits = runner.run(chosen.reshape(batch, 1), full_mask[:, :length])
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
