"""Perplexity of graphs on held-out token sequences, under ONNX Runtime (the evaluate stage).

    NLL = - 1/T * sum_{b, t >= 1} log softmax(logits[b, t - 1])[ids[b, t]],   perplexity = exp(NLL)

over T = N * (L - 1) predicted tokens of N sequences of L tokens (no padding: the sequences
are fixed-length windows from ``calib.corpora``). A float16/bfloat16 graph on the CPU is
evaluated as its float32 copy (``calib.half``; said in one line). The log-softmax runs in
float64 on the logits ORT returns, one batch at a time, so memory stays at one batch of logits.
``evaluate_graphs`` draws one set of sequences from the evaluation split of a text with the
first graph's tokenizer and evaluates every graph on them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra.graph_io import load_model_metadata

__all__ = ["Perplexity", "evaluate_graphs", "next_token_nll", "perplexity", "token_nll"]


@dataclasses.dataclass
class Perplexity:
    perplexity: float
    nll: float
    tokens: int

    def to_json(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def perplexity(
    graph_path: str | os.PathLike,
    sequences: np.ndarray,
    *,
    batch_size: int = 4,
    provider: str = "cpu",
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    from pangu_light.calib.half import float32_copy_for_cpu
    from pangu_light.runtime.layout import DecodeLayout
    from pangu_light.runtime.session import create_session

    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise PanguLightError("perplexity needs sequences of at least 2 tokens, shaped [N, L]")
    if batch_size < 1:
        raise PanguLightError(f"batch size must be at least 1 (got {batch_size})")
    with float32_copy_for_cpu(graph_path, "evaluation", provider) as runnable:
        session = create_session(runnable, provider=provider, threads=threads).session
    # A decode graph evaluates with an empty past.
    decode = any(contract.is_past_input(spec.name) for spec in session.get_inputs())
    cache = DecodeLayout.from_session(session) if decode else None
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start : start + batch_size].astype(np.int64)
        feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids)}
        if cache is not None:
            feeds.update(cache.empty_past(len(ids)))
        (logits,) = session.run([contract.LOGITS], feeds)
        batch_total, batch_count = next_token_nll(logits, ids)
        total += batch_total
        count += batch_count
        if on_batch is not None:
            on_batch(int(ids.size))
    nll = total / count
    return Perplexity(perplexity=float(np.exp(nll)), nll=nll, tokens=count)


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """The summed NLL of ``ids[:, 1:]`` under ``logits[:, :-1]`` (float64 log-softmax), and its count."""
    per_token = token_nll(logits, ids)
    return float(per_token.sum()), int(per_token.size)


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The NLL of each of ``ids[:, 1:]`` under ``logits[:, :-1]`` (float64 log-softmax), [B, L - 1]."""
    logits = logits[:, :-1].astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    target = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return log_norm - target


def evaluate_graphs(
    paths: Sequence[str | os.PathLike], *, data: str, samples: int | None, seq_len: int, seed: int = 0,
    tokenizer: Path | None = None, batch_size: int = 4, provider: str = "cpu", threads: int | None = None,
    quiet: bool = False,
) -> dict[str, Perplexity]:
    """{path: Perplexity} on one set of eval sequences drawn with the first graph's tokenizer."""
    from tqdm import tqdm

    from pangu_light.calib.text import graph_tokenizer, sequences_for

    encode, bos_id = graph_tokenizer(paths[0], load_model_metadata(paths[0]), tokenizer)
    sequences = sequences_for(data, encode, bos_id, samples=samples, seq_len=seq_len, seed=seed, split="eval")
    results = {}
    for path in paths:
        with tqdm(
            total=int(sequences.size), unit="tok", desc=f"eval {Path(path).name}", disable=quiet, file=sys.stderr
        ) as bar:
            results[str(path)] = perplexity(
                path, sequences, batch_size=batch_size, provider=provider, threads=threads, on_batch=bar.update
            )
    return results
