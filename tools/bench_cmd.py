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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pangu_light.passes.analysis.graph_stats import GraphStats
from pangu_light.runtime.benchmark import (
    WORKLOADS,
    Request,
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
from pangu_light.runtime.machine import describe_machine, format_machine, load_average
from pangu_light.runtime.session import ProviderFallbackWarning, create_session
from pangu_light.tools.io import atomic_path, load_model
from pangu_light.tools.run_cmd import add_session_arguments, session_options_from_args

__all__ = ["HELP", "add_arguments", "run", "workload_cost", "build_report", "format_report", "plot_report"]

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
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH (- prints it instead of the table)")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG chart to PATH")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe (one extra pass per graph)")


# --------------------------------------------------------------------------- ideal cost
def workload_cost(stats: GraphStats, requests: Sequence[Request], batch: int) -> dict[str, int]:
    """FLOPs and bytes the graph needs for the workload, from its GraphStats at any context.

    A request of n prompt tokens and m new tokens, batch B: the prefill computes n positions,
    position i attending over i + 1; decode step k = 1 .. m - 1 feeds one token that attends
    over n + k positions. Per position, FLOPs are projections + lm_head + attention per
    context position x context; a decode step reads all weight bytes W once plus each
    sequence's cache (kv bytes per position x context); a prefill reads W once and writes
    B x n positions of cache.
    """
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


def _speedups(base: dict[str, Any], graph: dict[str, Any], base_rounds, graph_rounds) -> dict[str, Any]:
    """Measured speedups (per-round paired ratios) and the ideal ones, graph over base."""
    cost_a, cost_b = base["cost"], graph["cost"]

    def paired(metric: str, higher_is_better: bool) -> Stat | None:
        ratios = []
        for ra, rb in zip(base_rounds, graph_rounds):
            a, b = getattr(ra, metric), getattr(rb, metric)
            if a is not None and b is not None:
                ratios.append(b / a if higher_is_better else a / b)
        return Stat.of(ratios)

    def entry(measured: Stat | None, flops: float | None, bytes_: float | None, ideal: float | None, basis: str):
        return {
            "measured": measured.to_json() if measured else None,
            "ideal_from_flops": flops,
            "ideal_from_bytes": bytes_,
            "ideal": ideal,
            "ideal_basis": basis if ideal is not None else None,
            "fraction_of_ideal": measured.median / ideal if measured and ideal else None,
        }

    prefill_flops = _ratio(cost_a["prefill_flops"], cost_b["prefill_flops"])
    prefill_bytes = _ratio(cost_a["prefill_bytes"], cost_b["prefill_bytes"])
    decode_flops = _ratio(cost_a["decode_flops"], cost_b["decode_flops"])
    decode_bytes = _ratio(cost_a["decode_bytes"], cost_b["decode_bytes"])
    total_flops = _ratio(cost_a["prefill_flops"] + cost_a["decode_flops"], cost_b["prefill_flops"] + cost_b["decode_flops"])
    total_bytes = _ratio(cost_a["prefill_bytes"] + cost_a["decode_bytes"], cost_b["prefill_bytes"] + cost_b["decode_bytes"])
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
        "prefill": entry(paired("mix_prefill_ms", False), prefill_flops, prefill_bytes, prefill_flops, "flops"),
        "decode": entry(
            paired("mix_decode_tokens_per_second", True), decode_flops, decode_bytes,
            decode_bytes if decode_s else None, "bytes",
        ),
        "throughput": entry(
            paired("mix_throughput_tokens_per_second", True), total_flops, total_bytes, throughput_ideal,
            "time split of the baseline: prefill by flops, decode by bytes",
        ),
    }


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

    costs = []
    for path in paths:  # GraphStats at context 1: the cost model scales attention itself
        costs.append(workload_cost(GraphStats.from_model(load_model(path), context=1), requests, args.batch))

    memory: list[dict | None] = [None] * len(paths)
    if not args.no_memory:
        probe_options = {k: v for k, v in session_options.items() if k != "strict"}
        for index, path in enumerate(paths):
            print(f"... peak memory of {path}", file=sys.stderr, flush=True)
            memory[index] = probe_memory(path, requests, args.batch, seed=args.seed, session_options=probe_options)

    load_start = load_average()
    rounds = measure(sessions, kinds, requests, prompts, repeats=args.repeats, warmup=args.warmup,
                     progress=_progress)
    load_end = load_average()

    report = build_report(
        args=args, paths=paths, requests=requests, sessions=sessions, fallbacks=fallbacks, kinds=kinds,
        costs=costs, memory=memory, rounds=rounds, load=(load_start, load_end),
    )
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if args.json:
            with atomic_path(args.json) as tmp:
                tmp.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        if args.json != "-":
            print(f"wrote {args.plot}")
    return 0


def build_report(*, args, paths, requests, sessions, fallbacks, kinds, costs, memory, rounds, load) -> dict[str, Any]:
    """The JSON report (fields documented in the README's Benchmark reports section)."""
    graphs = []
    for path, info, notes, kind, cost, mem, graph_rounds in zip(
        paths, sessions, fallbacks, kinds, costs, memory, rounds
    ):
        summary = summarize(graph_rounds, requests)
        graphs.append({
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
                {key: value if key in ("input_tokens", "output_tokens") else _stat_json(value)
                 for key, value in entry.items()}
                for entry in summary["requests"]
            ],
            "peak_memory": mem,
        })
    for graph, graph_rounds in zip(graphs, rounds):
        graph["speedup"] = _speedups(graphs[0], graph, rounds[0], graph_rounds)
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


# --------------------------------------------------------------------------- the table
def _short_provider(name: str) -> str:
    return name.removesuffix("ExecutionProvider")


def _cell(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "-"
    return f"{stat['median']:.{digits}f} [{stat['q1']:.{digits}f}-{stat['q3']:.{digits}f}]"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """The readable form: workload, machine, a row per graph, then speedups against ideals."""
    work = report["workload"]
    mix = ", ".join(f"{r['input_tokens']} in / {r['output_tokens']} out" for r in work["requests"])
    load = report["load_average"]
    load_text = (
        f"{load['start'][0]:.2f} -> {load['end'][0]:.2f}" if load["start"] and load["end"] else "unknown"
    )
    session = report["session"]
    lines = [
        f"workload {work['name']} (scale {work['scale']}, batch {work['batch']}): {mix}; "
        f"{work['repeats']} rounds after {work['warmup']} warm-up, graphs alternating; medians [quartiles]",
        f"machine: {format_machine(report['machine'])}",
        f"threads: {session['threads'] or 'onnxruntime default'}{'' if session['spinning'] else ' (no spinning)'}; optimization {session['optimization_level']}; "
        f"provider requested {session['requested_provider']}; load average (1 min) {load_text}",
        "",
    ]
    rows = [("graph", "providers", "prefill ms", "decode tok/s", "throughput tok/s", "peak MiB")]
    for graph in report["graphs"]:
        providers = ",".join(_short_provider(p) for p in graph["providers"])
        if graph["fell_back"]:
            providers += " (FELL BACK)"
        mem = graph["peak_memory"]
        rows.append((
            Path(graph["path"]).name, providers, _cell(graph["prefill_ms"]),
            _cell(graph["decode_tokens_per_second"]), _cell(graph["throughput_tokens_per_second"]),
            f"{mem['peak_rss_bytes'] / 2**20:.0f}" if mem and mem.get("peak_rss_bytes") else "-",
        ))
    lines += _columns(rows, right_from=2)
    base = Path(report["graphs"][0]["path"]).name
    if len(report["graphs"]) > 1:
        lines += ["", f"speedup over {base}"]
        rows = [("graph", "metric", "measured [quartiles]", "ideal FLOPs", "ideal bytes", "of ideal")]
        for graph in report["graphs"][1:]:
            for index, metric in enumerate(("prefill", "decode", "throughput")):
                s = graph["speedup"][metric]
                measured = s["measured"]
                text = (
                    f"{measured['median']:.2f}x [{measured['q1']:.2f}-{measured['q3']:.2f}]" if measured else "-"
                )
                basis = {"flops": "FLOPs", "bytes": "bytes"}.get(s["ideal_basis"], "mix")
                fraction = (
                    f"{100 * s['fraction_of_ideal']:.0f}% of {_times(s['ideal'])} ({basis})"
                    if s["fraction_of_ideal"] is not None else "-"
                )
                rows.append((
                    Path(graph["path"]).name if index == 0 else "", metric, text,
                    _times(s["ideal_from_flops"]), _times(s["ideal_from_bytes"]), fraction,
                ))
        lines += _columns(rows, right_from=2)
    for graph in report["graphs"]:
        for note in graph["provider_warnings"]:
            lines.append(f"warning: {Path(graph['path']).name}: {note}")
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]], right_from: int) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(width) if c >= right_from else cell.ljust(width)
            for c, (cell, width) in enumerate(zip(row, widths))
        ]
        out.append("  ".join(cells).rstrip())
    return out


# --------------------------------------------------------------------------- the chart
def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG: the three measured metrics per graph (median, quartile bars), and each graph's
    measured speedup next to its ideal one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = report["graphs"]
    names = [Path(g["path"]).name for g in graphs]
    metrics = [
        ("prefill_ms", "prefill latency (ms, lower is better)"),
        ("decode_tokens_per_second", "decode tokens/s"),
        ("throughput_tokens_per_second", "end-to-end tokens/s"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for ax, (key, title) in zip(axes, metrics):
        stats = [g[key] for g in graphs]
        heights = [s["median"] if s else 0.0 for s in stats]
        errors = [[s["median"] - s["q1"] if s else 0.0 for s in stats], [s["q3"] - s["median"] if s else 0.0 for s in stats]]
        ax.bar(range(len(graphs)), heights, yerr=errors, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(graphs)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    ax = axes[3]
    labels, measured, spread, ideal = [], [], [[], []], []
    for graph, name in zip(graphs[1:], names[1:]):
        for metric in ("prefill", "decode", "throughput"):
            s = graph["speedup"][metric]
            if s["measured"] is None:
                continue
            labels.append(f"{name}\n{metric}" if len(graphs) > 2 else metric)
            m = s["measured"]
            measured.append(m["median"])
            spread[0].append(m["median"] - m["q1"])
            spread[1].append(m["q3"] - m["median"])
            ideal.append(s["ideal"] or 0.0)
    if labels:
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], measured, width=0.4, yerr=spread, capsize=4, label="measured", color="tab:blue")
        ax.bar([i + 0.2 for i in x], ideal, width=0.4, label="ideal", color="tab:gray")
        for i, (value, target) in enumerate(zip(measured, ideal)):
            ax.annotate(f"{value:.2f}x", (i - 0.2, value), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 6), textcoords="offset points")
            if target:
                ax.annotate(f"{target:.2f}x", (i + 0.2, target), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"speedup over {names[0]}", fontsize=10)
    work = report["workload"]
    machine = report["machine"]
    threads = report["session"]["threads"] or "default"
    providers = ", ".join(sorted({_short_provider(p) for g in graphs for p in g["providers"][:1]}))
    fig.suptitle(
        f"workload {work['name']} (scale {work['scale']}, batch {work['batch']}), {work['repeats']} rounds; "
        f"{machine['cpu_model']}, {machine['logical_cores']} cores, {threads} threads, {providers}, "
        f"onnxruntime {machine['onnxruntime']}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
