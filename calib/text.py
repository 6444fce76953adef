"""Token sequences for a graph: the tokenizer it was exported with, and fixed-length windows of
a corpus split encoded by it (what calibrate, eval, distill and the benchmarks feed a graph)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from pangu_light.calib import corpora
from pangu_light.core.errors import PanguLightError

__all__ = ["graph_tokenizer", "sequences_for"]


def graph_tokenizer(
    graph_path: str | os.PathLike, metadata: Mapping[str, str], override: Path | None
) -> tuple[Callable[[str], list[int]], int | None]:
    """(encode without special tokens, BOS id or None) of the tokenizer the graph was exported with.

    The BOS id is returned only for tokenizers that add one by default (Gemma's): such models
    expect it first, so every sequence starts with it (see ``sequences_for``)."""
    from pangu_light.runtime.tokenizer import find_tokenizer_dir, load_tokenizer

    tokenizer = load_tokenizer(find_tokenizer_dir(graph_path, metadata, override))
    if tokenizer.hf:
        backend = tokenizer.backend

        def encode(text: str) -> list[int]:
            return list(backend(text, add_special_tokens=False)["input_ids"])

        with_specials = list(backend("a", add_special_tokens=True)["input_ids"])
        bos = backend.bos_token_id
        return encode, (bos if bos is not None and with_specials[:1] == [bos] else None)
    raw = tokenizer.backend

    def encode_raw(text: str) -> list[int]:
        return list(raw.encode(text, add_special_tokens=False).ids)

    return encode_raw, None


def sequences_for(
    source: str, encode, bos_id, *, samples: int | None, seq_len: int, seed: int, split: str
) -> np.ndarray:
    """Token windows of ``seq_len`` from ``split`` of ``source``; documents are joined by a blank
    line (not EOS: an instruct model's EOS ends a chat turn, and after it the next document is
    unpredictable), and with a BOS id each window is BOS + ``seq_len - 1`` tokens."""
    if samples is not None and samples < 1:
        raise PanguLightError(f"--samples must be at least 1 (got {samples})")
    if bos_id is None:
        return corpora.token_sequences(source, encode, samples=samples, seq_len=seq_len, seed=seed, split=split)
    windows = corpora.token_sequences(source, encode, samples=samples, seq_len=seq_len - 1, seed=seed, split=split)
    return np.concatenate([np.full((len(windows), 1), bos_id, dtype=windows.dtype), windows], axis=1)
