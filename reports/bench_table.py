"""The readable form of a ``pangu-light bench`` report: workload, machine, one row per graph
(medians [quartiles]), then each graph's measured speedup over the first next to its ideal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pangu_light.reports.machine import format_machine
from pangu_light.reports.table import format_table

__all__ = ["format_report", "short_provider"]


def short_provider(name: str) -> str:
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
        f"threads: {session['threads'] or 'onnxruntime default'}{'' if session['spinning'] else ' (no spinning)'}; "
        f"optimization {session['optimization_level']}; "
        f"provider requested {session['requested_provider']}; load average (1 min) {load_text}",
        "",
    ]
    rows = [("graph", "providers", "prefill ms", "decode tok/s", "throughput tok/s", "peak MiB")]
    for graph in report["graphs"]:
        providers = ",".join(short_provider(p) for p in graph["providers"])
        if graph["fell_back"]:
            providers += " (FELL BACK)"
        mem = graph["peak_memory"]
        rows.append(
            (
                Path(graph["path"]).name,
                providers,
                _cell(graph["prefill_ms"]),
                _cell(graph["decode_tokens_per_second"]),
                _cell(graph["throughput_tokens_per_second"]),
                f"{mem['peak_rss_bytes'] / 2**20:.0f}" if mem and mem.get("peak_rss_bytes") else "-",
            )
        )
    lines.append(format_table(rows, align="llrrrr"))
    base = Path(report["graphs"][0]["path"]).name
    if len(report["graphs"]) > 1:
        lines += ["", f"speedup over {base}"]
        rows = [("graph", "metric", "measured [quartiles]", "ideal FLOPs", "ideal bytes", "of ideal")]
        for graph in report["graphs"][1:]:
            for index, metric in enumerate(("prefill", "decode", "throughput")):
                s = graph["speedup"][metric]
                measured = s["measured"]
                text = f"{measured['median']:.2f}x [{measured['q1']:.2f}-{measured['q3']:.2f}]" if measured else "-"
                basis = {"flops": "FLOPs", "bytes": "bytes"}.get(s["ideal_basis"], "mix")
                fraction = (
                    f"{100 * s['fraction_of_ideal']:.0f}% of {_times(s['ideal'])} ({basis})"
                    if s["fraction_of_ideal"] is not None
                    else "-"
                )
                rows.append(
                    (
                        Path(graph["path"]).name if index == 0 else "",
                        metric,
                        text,
                        _times(s["ideal_from_flops"]),
                        _times(s["ideal_from_bytes"]),
                        fraction,
                    )
                )
        lines.append(format_table(rows, align="llrrrr"))
    for graph in report["graphs"]:
        for note in graph["provider_warnings"]:
            lines.append(f"warning: {Path(graph['path']).name}: {note}")
    return "\n".join(lines)
