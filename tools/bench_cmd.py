"""Measure graphs side by side on a generation workload, next to the speedup their cost predicts.

    pangu-light bench model-kv.onnx pruned-kv.onnx --workload paper --scale 8
    pangu-light bench model-kv.onnx pruned-kv.onnx --json bench.json --plot bench.png

Workloads (lengths divided by --scale, rounded up):

    paper    the paper's mix (section 4.1): 128 in / 1024 out and 256 in / 2048 out, one each
    prefill  prompts of 128 and 256 tokens, the prefill alone (no-cache graphs allowed)
    decode   128 in / 1024 out

Each request is a batch of --batch random prompts, greedy, without stop tokens. The graphs
are loaded once and run alternately, request by request, in one process; --warmup rounds are
thrown away; medians and quartiles are taken over --repeats rounds. Reported per graph:
prefill latency (mean over the mix's requests), decode tokens/s, end-to-end throughput (new
tokens / total time) and peak memory (a fresh process per graph runs the workload once; host
memory, VmHWM; skip with --no-memory).

Beside each measured speedup over the first graph, the ideal one from the graphs' cost over
the same workload (GraphStats): FLOPs (projections and lm_head per token, attention over the
positions each token sees) and bytes (a decode step reads every weight once plus each
sequence's KV cache; a prefill reads the weights once and writes the prompt's cache). The
ideal for the prefill is the FLOP ratio, for decoding the byte ratio, and for throughput the
first graph's measured time split with its prefill sped up by the FLOP ratio and its decode by
the byte ratio. The table, the JSON (--json PATH, or - for stdout instead of the table) and the
chart (--plot PATH, PNG) carry the machine (CPU, cores, RAM, OS, onnxruntime, providers), the
load average before and after, and the providers each session really used (a fall-back is
flagged). The JSON fields are documented in the README (Benchmark reports).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from pangu_light.core.files import write_json
from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.passes.infra.graph_io import load_model
from pangu_light.reports.bench_chart import plot_report
from pangu_light.reports.bench_cost import speedups, workload_cost
from pangu_light.reports.bench_table import format_report
from pangu_light.runtime.benchmark import (
    WORKLOADS,
    Stat,
    check_workload,
    graph_kind,
    logits_vocab,
    make_prompts,
    measure,
    probe_memory,
    summarize,
    workload_requests,
)
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.layout import DEPLOY_METADATA_KEY
from pangu_light.runtime.machine import describe_machine, load_average
from pangu_light.runtime.session import ProviderFallbackWarning, create_session
from pangu_light.tools.arguments import add_session_arguments, session_options_from_args

__all__ = ["HELP", "add_arguments", "run", "build_report"]

HELP = "measure graphs side by side (prefill, decode tokens/s, throughput, memory) against their ideal speedup"

SCHEMA_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graphs", type=Path, nargs="+", metavar="GRAPH.onnx",
                        help="graphs to compare; speedups are relative to the first")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="paper", help="default paper")
    parser.add_argument("--scale", type=int, default=1,
                        help="divide every input and output length by this (default 1: the paper's lengths)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per request (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and thrown away (default 1)")
    add_session_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    parser.add_argument(
        "--json", metavar="PATH", help="write the report as JSON to PATH (- prints it instead of the table)"
    )
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG chart to PATH")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory probe (one extra pass per graph)"
    )


# --------------------------------------------------------------------------- the run
def _progress(done: int, total: int) -> None:
    print(f"... round {done}/{total}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            raise RuntimeUserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.warmup < 0:
        raise RuntimeUserError(f"--warmup must be 0 or more (got {args.warmup})")
    requests = workload_requests(args.workload, args.scale)
    session_options = session_options_from_args(args)
    paths = [str(path) for path in args.graphs]

    # Sessions first: a no-cache graph or a bad provider fails before the slow parts.
    sessions, fallbacks = [], []
    for path in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ProviderFallbackWarning)
            sessions.append(create_session(path, **session_options))
        fallbacks.append([str(w.message) for w in caught if issubclass(w.category, ProviderFallbackWarning)])
    kinds = [graph_kind(info.session) for info in sessions]
    check_workload(paths, kinds, args.workload, requests)
    vocabs = [logits_vocab(info.session) for info in sessions]
    if any(v is None for v in vocabs):
        raise RuntimeUserError(
            f"{paths[vocabs.index(None)]} does not declare a fixed vocabulary size on its logits output: "
            "re-export it with `pangu-light export`"
        )
    prompts = make_prompts(min(vocabs), requests, args.batch, args.seed)

    costs = [_graph_cost(path, requests, args.batch) for path in paths]

    memory: list[dict | None] = [None] * len(paths)
    if not args.no_memory:
        probe_options = {k: v for k, v in session_options.items() if k != "strict"}
        for index, path in enumerate(paths):
            print(f"... peak memory of {path}", file=sys.stderr, flush=True)
            memory[index] = probe_memory(path, requests, args.batch, seed=args.seed, session_options=probe_options)

    load_start = load_average()
    rounds = measure(sessions, kinds, requests, prompts, repeats=args.repeats, warmup=args.warmup, progress=_progress)
    load_end = load_average()

    report = build_report(
        args=args,
        paths=paths,
        requests=requests,
        sessions=sessions,
        fallbacks=fallbacks,
        kinds=kinds,
        costs=costs,
        memory=memory,
        rounds=rounds,
        load=(load_start, load_end),
    )
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if args.json:
            write_json(args.json, report)
            print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        if args.json != "-":
            print(f"wrote {args.plot}")
    return 0


def _graph_cost(path: str, requests, batch: int) -> dict[str, int]:
    """The workload cost of ``path`` from its ``GraphStats`` at context 1 (the cost model scales
    attention itself). A deployment graph (``pangu-light deploy``: fused ops and MatMulNBits the
    model map does not read) takes the FLOPs of the decode graph it was built from, named in its
    record, and its own weight bytes: the initializers its MatMul/MatMulNBits nodes read per token."""
    model = load_model(path)
    raw = model.metadata_props.get(DEPLOY_METADATA_KEY)
    if raw is None:
        return workload_cost(GraphStats.from_model(model, context=1), requests, batch)
    source = json.loads(raw).get("source")
    if not source or not Path(source).is_file():
        raise RuntimeUserError(
            f"{path} is a deployment graph whose source decode graph ({source}) is not there: the cost model "
            "reads the source's FLOPs; keep the source graph, or bench the source graph instead"
        )
    cost = workload_cost(GraphStats.from_model(load_model(source), context=1), requests, batch)
    weights = sum(
        _constant_bytes(value)
        for node in model.graph
        if node.op_type in ("MatMul", "MatMulNBits")
        for value in node.inputs[1:]
    )
    delta = weights - cost["weight_bytes"]
    for request in requests:
        cost["prefill_bytes"] += delta
        cost["decode_bytes"] += (request.output_tokens - 1) * delta
    cost["weight_bytes"] = weights
    return cost


def _constant_bytes(value) -> int:
    """Bytes of a constant input (through a Transpose of one: a tied lm_head), else 0."""
    if value is None:
        return 0
    producer = value.producer()
    if value.const_value is None and producer is not None and producer.op_type == "Transpose":
        value = producer.inputs[0]
    return value.const_value.nbytes if value.const_value is not None else 0


def build_report(*, args, paths, requests, sessions, fallbacks, kinds, costs, memory, rounds, load) -> dict[str, Any]:
    """The JSON report (fields documented in the README's Benchmark reports section)."""
    graphs = []
    for path, info, notes, kind, cost, mem, graph_rounds in zip(
        paths, sessions, fallbacks, kinds, costs, memory, rounds
    ):
        summary = summarize(graph_rounds, requests)
        graphs.append(
            {
                "path": path,
                "graph_kind": kind,
                "providers": info.providers_in_use,
                "fell_back": info.fell_back,
                "provider_warnings": notes,
                "cost": cost,
                "prefill_ms": _stat_json(summary["prefill_ms"]),
                "decode_tokens_per_second": _stat_json(summary["decode_tokens_per_second"]),
                "throughput_tokens_per_second": _stat_json(summary["throughput_tokens_per_second"]),
                "requests": [
                    {
                        key: value if key in ("input_tokens", "output_tokens") else _stat_json(value)
                        for key, value in entry.items()
                    }
                    for entry in summary["requests"]
                ],
                "peak_memory": mem,
            }
        )
    for graph, graph_rounds in zip(graphs, rounds):
        graph["speedup"] = speedups(graphs[0], graph, _paired_speedups(rounds[0], graph_rounds))
    first = sessions[0]
    return {
        "schema_version": SCHEMA_VERSION,
        "workload": {
            "name": args.workload,
            "scale": args.scale,
            "batch": args.batch,
            "requests": [{"input_tokens": r.input_tokens, "output_tokens": r.output_tokens} for r in requests],
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        "machine": describe_machine(),
        "load_average": {"start": load[0], "end": load[1]},
        "session": {
            "requested_provider": args.provider,
            "provider_options": first.provider_options,
            "optimization_level": args.optimization,
            "threads": args.threads,
            "spinning": not args.no_spinning,
        },
        "graphs": graphs,
    }


def _stat_json(stat: Stat | None) -> dict[str, Any] | None:
    return stat.to_json() if stat is not None else None


def _paired_speedups(base_rounds, graph_rounds) -> dict[str, dict[str, Any] | None]:
    """Measured speedups of a graph over the base: per-round paired ratios, as stat JSON."""

    def paired(metric: str, higher_is_better: bool) -> dict[str, Any] | None:
        ratios = []
        for ra, rb in zip(base_rounds, graph_rounds):
            a, b = getattr(ra, metric), getattr(rb, metric)
            if a is not None and b is not None:
                ratios.append(b / a if higher_is_better else a / b)
        return _stat_json(Stat.of(ratios))

    return {
        "prefill": paired("mix_prefill_ms", False),
        "decode": paired("mix_decode_tokens_per_second", True),
        "throughput": paired("mix_throughput_tokens_per_second", True),
    }
