"""Measured latency of candidate shapes, and the on-disk table that remembers it.

A candidate's speed is measured on its real graph structure (the original graph compiled with
its plan; the weights' values do not matter for timing) through ``runtime.benchmark.measure``,
the machinery of ``pangu-light bench``: the unpruned graph and a group of candidates run the
workload alternately, round by round, and each candidate's speedup is the median over rounds of

    speedup_r = time_r(unpruned) / time_r(candidate)        (end-to-end: prefill + decode)

so that drifts of a shared machine hit both sides of each ratio alike. The table is one JSON
file per (provider, machine, model digest, workload, scale, batch) under the cache directory
(``search/latency/<key>.json``); an entry is keyed by ``candidates.shape_key`` and holds the
median, quartiles and samples of the speedup. A second search looks shapes up before measuring.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pangu_light.core.cache import default_cache_dir
from pangu_light.core.files import write_json
from pangu_light.runtime.benchmark import Request, Stat, graph_kind, logits_vocab, make_prompts, measure
from pangu_light.runtime.machine import describe_machine, load_average
from pangu_light.runtime.session import create_session

__all__ = ["LatencyTable", "file_digest", "measure_speedups", "table_key"]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a graph file (and its external-data file, when there is one), first 16 hex digits."""
    digest = hashlib.sha256()
    for part in (Path(path), Path(str(path) + ".data")):
        if part.is_file():
            with open(part, "rb") as stream:
                while block := stream.read(chunk):
                    digest.update(block)
    return digest.hexdigest()[:16]


def table_key(*, provider: str, model_digest: str, workload: str, scale: int, batch: int,
              threads: int | None) -> dict[str, Any]:
    """What a latency depends on besides the shape: provider, machine, model, workload, session."""
    machine = describe_machine()
    return {
        "provider": provider,
        "machine": {k: machine[k] for k in ("cpu_model", "logical_cores", "usable_cores", "ram_bytes", "onnxruntime")},
        "model_digest": model_digest,
        "workload": workload,
        "scale": scale,
        "batch": batch,
        "threads": threads,
    }


class LatencyTable:
    """Speedups by shape key for one table key, read from and written to one JSON file."""

    def __init__(self, key: dict[str, Any], directory: str | os.PathLike | None = None):
        self.key = key
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(directory or default_cache_dir() / "search" / "latency") / f"{name}.json"
        self.entries: dict[str, dict[str, Any]] = {}
        self.measured_now = 0  # entries measured by this process (the rest came from disk)
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("key") == key:
                self.entries = dict(data.get("entries", {}))

    def __contains__(self, shape: str) -> bool:
        return shape in self.entries

    def speedup(self, shape: str) -> dict[str, Any] | None:
        return self.entries.get(shape)

    def record(self, shape: str, entry: dict[str, Any], *, new: bool = True) -> None:
        """Store ``entry``; ``new=False`` for a shape measured again (not counted in measured_now)."""
        self.entries[shape] = entry
        self.measured_now += int(new)
        write_json(self.path, {"key": self.key, "entries": self.entries})


def measure_speedups(
    baseline: str | os.PathLike, graphs: Sequence[str | os.PathLike], requests: Sequence[Request], *,
    batch: int = 1, repeats: int = 3, session_options: dict[str, Any] | None = None, seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per graph, its end-to-end speedup over ``baseline`` (paired per round; median, quartiles,
    samples) and the load average around the measurement."""
    options = dict(session_options or {})
    sessions = [create_session(str(p), **options) for p in (baseline, *graphs)]
    kinds = [graph_kind(info.session) for info in sessions]
    vocab = min(logits_vocab(info.session) or 2 for info in sessions)
    prompts = make_prompts(vocab, requests, batch, seed)
    start = load_average()
    # One whole round is thrown away: a warm-up shorter than the workload leaves ORT's arenas to
    # grow in the first measured round (measured: that round's ratios were 0.5-0.7x the others').
    rounds = measure(sessions, kinds, requests, prompts, repeats=repeats, warmup=1, progress=progress)
    end = load_average()
    results = []
    for graph_rounds in rounds[1:]:
        ratios = [g.mix_throughput_tokens_per_second / b.mix_throughput_tokens_per_second
                  for b, g in zip(rounds[0], graph_rounds)]
        stat = Stat.of(ratios)
        results.append({**stat.to_json(), "load_average": [start, end],
                        "providers": sessions[len(results) + 1].providers_in_use})
    return results
