"""The ideal cost of a generation workload and the speedups it predicts (``pangu-light bench``).

A request of n prompt tokens and m new tokens, batch B: the prefill computes n positions,
position i attending over i + 1; decode step k = 1 .. m - 1 feeds one token that attends over
n + k positions. Per position, FLOPs are projections + lm_head + attention per context
position x context. Bytes: a decode step reads every weight byte W once plus each sequence's
cache (KV bytes per position x context); a prefill reads W once and writes B x n positions of
cache.

The ideal speedup of graph B over graph A is A's cost over B's: for the prefill the FLOP ratio,
for decoding the byte ratio, and for end-to-end throughput A's measured time split with its
prefill sped up by the FLOP ratio and its decode by the byte ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["workload_cost", "speedups"]


def workload_cost(stats, requests: Sequence, batch: int) -> dict[str, int]:
    """FLOPs and bytes the graph needs for the workload, from its ``GraphStats`` (taken at any
    context) and ``requests`` with ``input_tokens`` and ``output_tokens``."""
    per_token = stats.projection_flops + stats.lm_head_flops
    attention = stats.attention_flops // stats.context  # per position attended
    unit = stats.bytes_per_token_decode(context=1)
    weights, kv = unit.weight_bytes, unit.kv_cache_bytes  # kv: bytes per cached position
    cost = dict(prefill_flops=0, prefill_bytes=0, decode_flops=0, decode_bytes=0, decode_tokens=0)
    for r in requests:
        n, steps = r.input_tokens, r.output_tokens - 1
        attended = steps * n + steps * (steps + 1) // 2  # sum over k of (n + k)
        cost["prefill_flops"] += batch * (n * per_token + attention * n * (n + 1) // 2)
        cost["prefill_bytes"] += weights + batch * kv * n
        cost["decode_flops"] += batch * (steps * per_token + attention * attended)
        cost["decode_bytes"] += steps * weights + batch * kv * attended
        cost["decode_tokens"] += batch * steps
    return {
        **cost,
        "parameters": stats.total_parameters,
        "weight_bytes": weights,
        "kv_bytes_per_position": kv,
        "dense_flops_per_token": per_token,
        "attention_flops_per_position": attention,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def speedups(base: dict[str, Any], graph: dict[str, Any], measured: dict[str, dict | None]) -> dict[str, Any]:
    """The report's ``speedup`` entry of ``graph`` over ``base`` (both report graph entries with
    ``cost``, and the base with its measured ``prefill_ms`` and ``decode_tokens_per_second``):
    ``measured`` holds the paired speedups (stat JSON or None) for prefill, decode, throughput."""
    cost_a, cost_b = base["cost"], graph["cost"]

    def entry(metric: str, flops: float | None, bytes_: float | None, ideal: float | None, basis: str):
        stat = measured[metric]
        return {
            "measured": stat,
            "ideal_from_flops": flops,
            "ideal_from_bytes": bytes_,
            "ideal": ideal,
            "ideal_basis": basis if ideal is not None else None,
            "fraction_of_ideal": stat["median"] / ideal if stat and ideal else None,
        }

    prefill_flops = _ratio(cost_a["prefill_flops"], cost_b["prefill_flops"])
    prefill_bytes = _ratio(cost_a["prefill_bytes"], cost_b["prefill_bytes"])
    decode_flops = _ratio(cost_a["decode_flops"], cost_b["decode_flops"])
    decode_bytes = _ratio(cost_a["decode_bytes"], cost_b["decode_bytes"])
    total_flops = _ratio(
        cost_a["prefill_flops"] + cost_a["decode_flops"], cost_b["prefill_flops"] + cost_b["decode_flops"]
    )
    total_bytes = _ratio(
        cost_a["prefill_bytes"] + cost_a["decode_bytes"], cost_b["prefill_bytes"] + cost_b["decode_bytes"]
    )
    # The base's time split: prefill seconds and decode seconds over the mix (medians).
    n_requests = len(base["requests"])
    prefill_s = base["prefill_ms"]["median"] * n_requests / 1e3
    decode_tps = base["decode_tokens_per_second"]
    decode_s = cost_a["decode_tokens"] / decode_tps["median"] if decode_tps else 0.0
    throughput_ideal = None
    if prefill_flops and (decode_bytes or not decode_s):
        ideal_time = prefill_s / prefill_flops + (decode_s / decode_bytes if decode_s else 0.0)
        throughput_ideal = (prefill_s + decode_s) / ideal_time
    return {
        "baseline": base["path"],
        "prefill": entry("prefill", prefill_flops, prefill_bytes, prefill_flops, "flops"),
        "decode": entry("decode", decode_flops, decode_bytes, decode_bytes if decode_s else None, "bytes"),
        "throughput": entry(
            "throughput",
            total_flops,
            total_bytes,
            throughput_ideal,
            "time split of the baseline: prefill by flops, decode by bytes",
        ),
    }
