"""Speed of graphs under ONNX Runtime on a generation workload, measured side by side.

A workload is a mix of requests, each ``input_tokens`` prompt tokens and ``output_tokens`` new
tokens, run as a batch of ``batch`` prompts of that length (random token ids, the same for
every graph; greedy choice; no stop tokens, so every request runs its full length):

    paper    the paper's mix (section 4.1), one request of each:
             128 in / 1024 out and 256 in / 2048 out
    prefill  prompts of 128 and 256 tokens, 1 output token (the prefill alone; no-cache
             graphs can run it)
    decode   128 in / 1024 out (decode-dominated)

``scale`` divides every length (rounding up, at least 1), for small machines: ``paper`` at
scale 8 is 16 / 128 and 32 / 256.

``measure`` runs ``warmup`` rounds that are thrown away, then ``repeats`` rounds; in each
round every request runs once on every graph, graphs alternating request by request (A, B,
A, B, ...; the order flips each round) so that drifts of the machine hit all alike. Per
graph and round it computes, over the whole mix:

    prefill_ms                   mean prefill latency of a request (the first graph run:
                                 the whole prompt, an empty past)
    decode_tokens_per_second     batch x decode steps / decode time (every later step,
                                 including choosing the token)
    throughput_tokens_per_second new tokens / (prefill + decode time), end to end

and the same per request; ``summarize`` gives medians, quartiles and extremes over rounds.

``probe_memory`` runs one graph over the workload once in a fresh Python process and reads
its peak resident memory (VmHWM) and the baseline before the session was made; on an
accelerator that is host memory only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from pangu_light.core import contract
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.generate import GenerationResult, generate

__all__ = [
    "WORKLOADS",
    "Request",
    "Stat",
    "check_workload",
    "graph_kind",
    "logits_vocab",
    "make_prompts",
    "measure",
    "probe_memory",
    "run_request",
    "summarize",
    "workload_requests",
]

# name -> ((input tokens, output tokens), ...) before scaling
WORKLOADS: dict[str, tuple[tuple[int, int], ...]] = {
    "paper": ((128, 1024), (256, 2048)),
    "prefill": ((128, 1), (256, 1)),
    "decode": ((128, 1024),),
}


@dataclass(frozen=True)
class Request:
    input_tokens: int
    output_tokens: int


def workload_requests(name: str, scale: int = 1) -> list[Request]:
    """The workload's requests with every length divided by ``scale`` (rounded up, at least 1)."""
    if name not in WORKLOADS:
        raise RuntimeUserError(f"unknown workload {name!r}: use one of {', '.join(WORKLOADS)}")
    if not isinstance(scale, int) or scale < 1:
        raise RuntimeUserError(f"scale must be a whole number of at least 1 (got {scale})")
    requests = []
    for n_in, n_out in WORKLOADS[name]:
        out = 1 if n_out == 1 else max(1, math.ceil(n_out / scale))
        requests.append(Request(max(1, math.ceil(n_in / scale)), out))
    return requests


def graph_kind(session: ort.InferenceSession) -> str:
    """``decode`` when the graph takes a KV cache (past_key_values.* inputs), else ``no-cache``."""
    names = [arg.name for arg in session.get_inputs()]
    return "decode" if any(contract.is_past_input(name) for name in names) else "no-cache"


def logits_vocab(session: ort.InferenceSession) -> int | None:
    """The fixed last dimension of the graph's ``logits`` output (None when symbolic)."""
    for arg in session.get_outputs():
        if arg.name == contract.LOGITS and isinstance(arg.shape[-1], int):
            return arg.shape[-1]
    return None


def make_prompts(vocab: int, requests: Sequence[Request], batch: int, seed: int = 0) -> list[list[list[int]]]:
    """For each request, ``batch`` prompts of its length: random ids in [0, vocab), seeded."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, r.input_tokens)).tolist() for r in requests]


def _run_no_cache(session: ort.InferenceSession, prompts: list[list[int]]) -> GenerationResult:
    """One forward of a no-cache graph over the prompts: the prefill, and its arg-max token."""
    ids = np.asarray(prompts, dtype=np.int64)
    feeds = {contract.INPUT_IDS: ids}
    if any(arg.name == contract.ATTENTION_MASK for arg in session.get_inputs()):
        feeds[contract.ATTENTION_MASK] = np.ones_like(ids)
    start = time.perf_counter()
    logits = session.run([contract.LOGITS], feeds)[0]
    tokens = np.argmax(logits[:, -1, :], axis=-1)
    elapsed = time.perf_counter() - start
    return GenerationResult([[int(t)] for t in tokens], elapsed, 0.0, 0, len(prompts))


def run_request(info, kind: str, prompts: list[list[int]], request: Request) -> GenerationResult:
    """Run one request on a session (``SessionInfo`` or bare session) of the given kind."""
    if kind == "decode":
        return generate(info, prompts, request.output_tokens)
    session = getattr(info, "session", info)
    return _run_no_cache(session, prompts)


def check_workload(names: Sequence[str], kinds: Sequence[str], workload: str, requests: Sequence[Request]) -> None:
    """A workload that decodes needs decode graphs: name the first graph that is not one."""
    if all(r.output_tokens == 1 for r in requests):
        return
    for name, kind in zip(names, kinds):
        if kind != "decode":
            raise RuntimeUserError(
                f"{name} is a no-cache graph (no past_key_values.* inputs), but the {workload} workload "
                "decodes token by token: export it with `pangu-light export --kv-cache` (and compile "
                "that), or use --workload prefill"
            )


@dataclass
class RoundResult:
    """One graph's results for one round: per request, then over the mix."""

    prefill_ms: list[float]
    decode_tokens_per_second: list[float | None]
    throughput_tokens_per_second: list[float]
    mix_prefill_ms: float
    mix_decode_tokens_per_second: float | None
    mix_throughput_tokens_per_second: float


def _round_result(results: Sequence[GenerationResult]) -> RoundResult:
    decode_tokens = sum(r.batch * r.decode_steps for r in results)
    decode_seconds = sum(r.decode_seconds for r in results)
    new_tokens = sum(r.new_tokens for r in results)
    total = sum(r.total_seconds for r in results)
    return RoundResult(
        prefill_ms=[r.prefill_seconds * 1e3 for r in results],
        decode_tokens_per_second=[r.decode_tokens_per_second if r.decode_steps else None for r in results],
        throughput_tokens_per_second=[r.new_tokens / r.total_seconds for r in results],
        mix_prefill_ms=float(np.mean([r.prefill_seconds for r in results]) * 1e3),
        mix_decode_tokens_per_second=decode_tokens / decode_seconds if decode_tokens else None,
        mix_throughput_tokens_per_second=new_tokens / total,
    )


def measure(
    sessions: Sequence,
    kinds: Sequence[str],
    requests: Sequence[Request],
    prompts: Sequence[list[list[int]]],
    *,
    repeats: int,
    warmup: int = 1,
    progress=None,
) -> list[list[RoundResult]]:
    """Rounds of the workload on every session, alternating; returns [graph][round] after warm-up.

    ``progress(round_index, total_rounds)`` is called after each round when given.
    """
    if repeats < 1:
        raise RuntimeUserError(f"repeats must be at least 1 (got {repeats})")
    if warmup < 0:
        raise RuntimeUserError(f"warmup must be 0 or more (got {warmup})")
    rounds: list[list[RoundResult]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for round_index in range(warmup + repeats):
        per_graph: list[list[GenerationResult]] = [[] for _ in sessions]
        for request, batch_prompts in zip(requests, prompts):
            for g in order:
                per_graph[g].append(run_request(sessions[g], kinds[g], batch_prompts, request))
        if round_index >= warmup:
            for g, results in enumerate(per_graph):
                rounds[g].append(_round_result(results))
        order.reverse()
        if progress is not None:
            progress(round_index + 1, warmup + repeats)
    return rounds


@dataclass
class Stat:
    """Median, quartiles and extremes of one metric over rounds (samples in round order)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float | None]) -> Stat | None:
        values = [float(s) for s in samples if s is not None]
        if not values:
            return None
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), min(values), max(values), values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(rounds: Sequence[RoundResult], requests: Sequence[Request]) -> dict[str, Any]:
    """Stats over rounds for one graph: the mix, and each request."""
    per_request = []
    for index, request in enumerate(requests):
        per_request.append({
            "input_tokens": request.input_tokens,
            "output_tokens": request.output_tokens,
            "prefill_ms": Stat.of([r.prefill_ms[index] for r in rounds]),
            "decode_tokens_per_second": Stat.of([r.decode_tokens_per_second[index] for r in rounds]),
            "throughput_tokens_per_second": Stat.of([r.throughput_tokens_per_second[index] for r in rounds]),
        })
    return {
        "prefill_ms": Stat.of([r.mix_prefill_ms for r in rounds]),
        "decode_tokens_per_second": Stat.of([r.mix_decode_tokens_per_second for r in rounds]),
        "throughput_tokens_per_second": Stat.of([r.mix_throughput_tokens_per_second for r in rounds]),
        "requests": per_request,
    }


# --------------------------------------------------------------------------- peak memory
def probe_memory(
    path: str,
    requests: Sequence[Request],
    batch: int,
    *,
    seed: int = 0,
    session_options: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> dict[str, int | None]:
    """Peak resident memory of one graph running the workload once, in a fresh process.

    Returns ``{"peak_rss_bytes", "baseline_rss_bytes", "graph_peak_bytes"}``: the child's
    VmHWM after the run, its resident memory before the session was created (Python, numpy,
    onnxruntime), and the difference (weights, ONNX Runtime's copies and arena, activations,
    KV cache).
    """
    spec = {
        "path": str(path),
        "requests": [asdict(r) for r in requests],
        "batch": batch,
        "seed": seed,
        "session_options": session_options or {},
    }
    result = subprocess.run(
        [sys.executable, "-m", "pangu_light.runtime.benchmark", "--probe-memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeUserError(
            f"the memory probe for {path} failed ({lines[-1] if lines else f'exit status {result.returncode}'}): "
            "run the bench with --no-memory to skip it"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _probe_main(spec: dict[str, Any]) -> dict[str, int | None]:
    import warnings

    from pangu_light.runtime.machine import current_rss_bytes, peak_rss_bytes
    from pangu_light.runtime.session import create_session

    requests = [Request(**r) for r in spec["requests"]]
    baseline = current_rss_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = create_session(spec["path"], **spec["session_options"])
    kind = graph_kind(info.session)
    vocab = logits_vocab(info.session) or 2
    for request, prompts in zip(requests, make_prompts(vocab, requests, spec["batch"], spec["seed"])):
        run_request(info, kind, prompts, request)
    peak = peak_rss_bytes()
    return {
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "graph_peak_bytes": peak - baseline if peak is not None and baseline is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: the peak-memory probe of `pangu-light bench`")
    parser.add_argument("--probe-memory", required=True, metavar="JSON")
    args = parser.parse_args(argv)
    print(json.dumps(_probe_main(json.loads(args.probe_memory))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
