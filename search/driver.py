"""The search loop: measure a design set of shapes, fit the cost model, compute the quality
proxy where it matters, choose, and verify the choice by measurement.

    1. design   the spread candidates and evenly spaced uniform ones (by parameter count) are
                measured (``latency``), unless the table already holds their shape;
    2. model    ``cost_model`` is fitted to every measured shape; it predicts the rest, and its
                leave-one-out error on the measured shapes is reported;
    3. proxy    the KL proxy (``proxy``) for the measured shapes, then for the candidates whose
                speedup (measured, else predicted) is at least the target, slowest first (the
                largest, so the best quality is found early), while the budget lasts;
    4. choose   the lowest proxy among candidates whose speedup reaches the target; a predicted
                one is measured first (with the next few), until the choice is measured. Shapes
                with a lower proxy whose median missed the target but whose upper quartile
                reached it (``near_target``) are measured once more with the choice, their rounds
                pooled, and the choice made again: a shape is not passed over for one noisy run.

Every measurement runs the unpruned graph alongside, so speedups are paired ratios. The
budget bounds steps 1 (to its first half) and 3; step 4 always runs, since an unmeasured choice
is never returned. (On SmolLM2 with a machine loaded 11 on 2 cores, a group of 4 shapes took
3-10 minutes and a proxy 1-3: design and proxies then share the budget.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from pangu_light.calib.gram import GramStats
from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra.plan import PrunePlan
from pangu_light.passes.surgery.rotation_basis import Rotation
from pangu_light.runtime.benchmark import Request, Stat
from pangu_light.search.build import compile_candidate
from pangu_light.search.candidates import Candidate, shape_of_plan
from pangu_light.search.cost_model import CostModel, features, leave_one_out
from pangu_light.search.latency import LatencyTable, measure_speedups
from pangu_light.search.proxy import graph_log_probs, kl_divergence

__all__ = ["SearchConfig", "SearchResult", "run_search"]


@dataclasses.dataclass
class SearchConfig:
    target: float
    requests: list[Request]
    batch: int = 1
    repeats: int = 3
    session_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    budget_seconds: float = 600.0
    design_points: int = 8
    group_size: int = 4
    threads: int | None = None
    quiet: bool = False


@dataclasses.dataclass
class SearchResult:
    rows: list[dict[str, Any]]  # one per candidate
    chosen: Candidate
    chosen_row: dict[str, Any]
    cost_model: dict[str, Any]
    measured_now: int
    seconds: float


def run_search(
    *, original: str | os.PathLike, timing_graph: str | os.PathLike, candidates: Sequence[Candidate],
    identity: PrunePlan, head_dim: int, grams: GramStats, proxy_sequences: np.ndarray,
    table: LatencyTable, config: SearchConfig, eval_sequences: np.ndarray | None = None,
    proxy_cache: dict[str, dict[str, float]] | None = None, rotation: Rotation | None = None,
) -> SearchResult:
    """``original``: the unpruned no-cache graph (proxy); ``timing_graph``: the graph the workload
    runs (the decode graph, or the no-cache one for the prefill workload); ``rotation``: what
    candidates with hidden method rotate were planned with (their refit needs it). ``proxy_cache`` (updated
    in place) remembers proxies by plan and sequences (``proxy_key``), e.g. across searches."""
    from tqdm import tqdm

    start = time.perf_counter()
    deadline = start + config.budget_seconds
    base = shape_of_plan(identity)
    rows_by_key = {c.key: features(shape_of_plan(c.plan), base, head_dim) for c in candidates}
    base_row = features(base, base, head_dim)
    proxies: dict[str, dict[str, float]] = {}
    proxy_cache = {} if proxy_cache is None else proxy_cache
    bar = tqdm(total=0, desc="search", unit="step", disable=config.quiet, file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="pangu-search-"))
    loaded: dict[str, Any] = {}

    def reference() -> np.ndarray:
        if "reference" not in loaded:
            loaded["original"] = ir.load(str(original))
            loaded["reference"] = graph_log_probs(original, proxy_sequences, threads=config.threads)
        return loaded["reference"]

    def step(n: int, what: str) -> None:
        bar.total += n
        bar.set_description(f"search: {what}")
        bar.refresh()

    def timed(group: list[Candidate], repeats: int, what: str) -> list[dict[str, Any]]:
        """Each shape of ``group`` compiled and its speedup measured over ``repeats`` rounds."""
        step(len(group), what)
        paths = [compile_candidate(timing_graph, c.plan, work / f"time-{i}.onnx") for i, c in enumerate(group)]
        results = measure_speedups(timing_graph, paths, config.requests, batch=config.batch,
                                   repeats=repeats, session_options=config.session_options)
        for p in paths:
            _remove_graph(p)
        bar.update(len(group))
        return results

    def measure(group: list[Candidate]) -> None:
        todo = [c for c in group if c.key not in table]
        if todo:
            for c, result in zip(todo, timed(todo, config.repeats, f"measuring {len(todo)} shapes")):
                table.record(c.key, {**result, "label": c.label})

    def proxy(c: Candidate, cached_only: bool = False) -> None:
        if c.key in proxies:
            return
        key = proxy_key(c.plan, proxy_sequences, eval_sequences)
        if key in proxy_cache or cached_only:
            if key in proxy_cache:
                proxies[c.key] = proxy_cache[key]
            return
        step(1, f"proxy {c.label}")
        expected = reference()
        path = compile_candidate(original, c.plan, work / "proxy.onnx", original=loaded["original"], grams=grams,
                                  rotation=rotation)
        entry = {"kl": kl_divergence(expected, graph_log_probs(path, proxy_sequences, threads=config.threads))}
        if eval_sequences is not None:
            from pangu_light.calib.evaluate import perplexity
            entry["perplexity"] = perplexity(path, eval_sequences, threads=config.threads).perplexity
        proxies[c.key] = proxy_cache[key] = entry
        _remove_graph(path)
        bar.update(1)

    remeasured: list[str] = []

    def remeasure(group: list[Candidate]) -> None:
        """Measure ``group`` again (twice the rounds) and pool the rounds with the earlier ones."""
        results = timed(group, 2 * config.repeats, f"measuring {len(group)} shapes near the target again")
        for c, result in zip(group, results):
            earlier = table.speedup(c.key)
            pooled = Stat.of([*earlier["samples"], *result["samples"]]).to_json()
            table.record(c.key, {**earlier, **pooled, "remeasured": True}, new=False)
            remeasured.append(c.key)

    def fitted() -> tuple[CostModel, list[float]]:
        keys = [k for k in table.entries if k in rows_by_key]
        rows = [rows_by_key[k] for k in keys]
        speedups = [table.entries[k]["median"] for k in keys]
        model = CostModel.fit([base_row, *rows], [1.0, *(1.0 / s for s in speedups)])
        errors = leave_one_out(rows, speedups, base_row) if len(rows) > 2 else []
        return model, errors

    def speed(c: Candidate, model: CostModel) -> tuple[float, bool]:
        entry = table.speedup(c.key)
        return (entry["median"], True) if entry else (model.speedup(rows_by_key[c.key]), False)

    try:
        # 1. design set
        by_size = sorted(candidates, key=lambda c: c.parameters)
        uniform = [c for c in by_size if c.kind == "uniform"]
        picks = np.linspace(0, len(uniform) - 1, min(config.design_points, len(uniform))).round().astype(int)
        design = [c for c in by_size if c.kind == "spread"] + [uniform[i] for i in sorted(set(picks))]
        for i in range(0, len(design), config.group_size):  # at most half the budget
            if time.perf_counter() > start + config.budget_seconds / 2 and any(c.key in table for c in design):
                break
            measure(design[i: i + config.group_size])
        # 2. cost model
        model, errors = fitted()
        # 3. proxies
        for c in candidates:  # what an earlier search already knows costs nothing
            proxy(c, cached_only=True)
        fast = sorted((c for c in candidates if speed(c, model)[0] >= config.target), key=lambda c: speed(c, model)[0])
        slow = [c for c in candidates if c.key in table and c not in fast]
        order = [c for c in fast if c.key in table] + [c for c in fast if c.key not in table] + slow
        for c in order:
            if time.perf_counter() > deadline and any(f.key in proxies for f in fast):
                break
            proxy(c)
        # 4. choose and verify
        while True:
            model, errors = fitted()
            ready = [c for c in candidates if c.key in proxies and speed(c, model)[0] >= config.target]
            near = sorted((c for c in candidates
                           if c.key in proxies and near_target(table.speedup(c.key), config.target)),
                          key=lambda c: proxies[c.key]["kl"])
            if not ready and near and not remeasured:
                remeasure(near[: config.group_size])
                continue
            if not ready:
                best = max(candidates, key=lambda c: speed(c, model)[0])
                value, was_measured = speed(best, model)
                raise PanguLightError(
                    f"no candidate reaches a {config.target:g}x speedup: the fastest, {best.label}, "
                    f"{'measured' if was_measured else 'predicted'} {value:.2f}x; lower --target-speedup "
                    "(or raise --budget-minutes so that more shapes get a quality estimate)"
                )
            ready.sort(key=lambda c: proxies[c.key]["kl"])
            if ready[0].key not in table:
                measure([c for c in ready if c.key not in table][: config.group_size])
                continue
            chosen = ready[0]
            near = [c for c in near if proxies[c.key]["kl"] < proxies[chosen.key]["kl"]]
            if not near or remeasured:
                break
            remeasure([chosen, *near][: config.group_size])  # once: a noisy miss may be a better choice
    finally:
        bar.close()
        _remove_graph(work / "proxy.onnx")
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()

    rows = []
    for c in candidates:
        value, was_measured = speed(c, model)
        entry = table.speedup(c.key) or {}
        rows.append({
            **c.describe(),
            "speedup": round(value, 4),
            "measured": was_measured,
            "speedup_q1": entry.get("q1"),
            "speedup_q3": entry.get("q3"),
            **{k: v for k, v in proxies.get(c.key, {}).items()},
        })
    cost = {"coefficients": model.to_json(), "leave_one_out_relative_errors": [round(e, 4) for e in errors],
            "median_abs_relative_error": float(np.median(np.abs(errors))) if errors else None,
            "measured_shapes": sum(1 for c in candidates if c.key in table)}
    chosen_row = next(r for r in rows if r["label"] == chosen.label)
    return SearchResult(rows, chosen, chosen_row, cost, table.measured_now, time.perf_counter() - start)


def near_target(entry: dict[str, Any] | None, target: float) -> bool:
    """A measured speedup whose median misses ``target`` while its upper quartile reaches it: the
    miss may be the machine's noise, so such a shape is measured again (once: the table remembers)
    before it is passed over."""
    return entry is not None and not entry.get("remeasured") and entry["median"] < target <= entry["q3"]


def proxy_key(plan: PrunePlan, sequences: np.ndarray, eval_sequences: np.ndarray | None) -> str:
    """What a proxy depends on: every kept index of the plan (and its SLNP scales), the sequences."""
    data = {k: v for k, v in plan.to_json().items() if k not in ("targets", "source", "estimate")}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(sequences, dtype=np.int64).tobytes())
    if eval_sequences is not None:
        digest.update(b"eval" + np.ascontiguousarray(eval_sequences, dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


def _remove_graph(path: Path) -> None:
    for part in (path, Path(str(path) + ".data")):
        if part.exists():
            part.unlink()


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a proxy and a measured speedup that no other such row beats on both: sorted by
    speedup, their proxy never decreases as the speedup grows."""
    points = sorted((r for r in rows if r.get("kl") is not None and r["measured"]),
                    key=lambda r: (-r["speedup"], r["kl"]))
    front, best = [], float("inf")
    for r in points:
        if r["kl"] < best:
            front.append(r)
            best = r["kl"]
    return front[::-1]


def json_ready(result: SearchResult) -> dict[str, Any]:
    return json.loads(json.dumps({"rows": result.rows, "chosen": result.chosen_row, "cost_model": result.cost_model,
                                  "measured_now": result.measured_now, "seconds": round(result.seconds, 1)}))
