"""The quality proxy: KL divergence to the unpruned model after one-shot pruning.

For a candidate, the original no-cache graph is compiled with its plan and refit (the
re-initialisation ``prune`` applies by default: each pruned o_proj/down_proj refit by ridge
least squares to the unpruned layer's output, ``calib.refit_plan``). On a few calibration
sequences (N sequences of L tokens, run through ONNX Runtime), with p the unpruned model's
next-token distribution and q the candidate's,

    KL = 1 / (N L) * sum_{b, t} sum_v p[b, t, v] (log p[b, t, v] - log q[b, t, v])

in nats per token, computed in float64 on the logits. Lower is better; 0 is the unpruned model.
``benchmarks/search_quality.py`` measures how well it ranks candidates against held-out
perplexity.
"""

from __future__ import annotations

import os

import numpy as np

from pangu_light.core import contract
from pangu_light.runtime.session import create_session

__all__ = ["graph_log_probs", "kl_divergence"]


def graph_log_probs(path: str | os.PathLike, sequences: np.ndarray, *, batch_size: int = 4,
                    threads: int | None = None) -> np.ndarray:
    """Log-softmax of a no-cache graph's logits over ``sequences`` [N, L] -> [N, L, V] float64."""
    session = create_session(str(path), provider="cpu", threads=threads).session
    names = {arg.name for arg in session.get_inputs()}
    out = []
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start: start + batch_size].astype(np.int64)
        feeds = {contract.INPUT_IDS: ids}
        if contract.ATTENTION_MASK in names:
            feeds[contract.ATTENTION_MASK] = np.ones_like(ids)
        logits = session.run([contract.LOGITS], feeds)[0].astype(np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        out.append(logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))
    return np.concatenate(out)


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(p || q) per token (nats) from log-probabilities [N, L, V]."""
    p = np.exp(reference)
    return float((p * (reference - candidate)).sum(axis=-1).mean())
