"""Compare two graphs of the same model: size, cost, per-layer shapes and what the passes did.

    pangu-light diff model.onnx pruned.onnx
    pangu-light diff model.onnx pruned.onnx --json --context 2048

Reports, for A and B: parameters and FLOPs per token (with B/A ratios), hidden size, layer
count, bytes read per decoded token, a per-layer table of heads, KV heads, head_dim, FFN
width and parameters side by side, the op counts that differ, and B's provenance: the
pipeline that produced it and how many nodes and initializers each pass tagged.

Parameters count the embedding, every norm gamma, every projection weight and bias and the
lm_head (a tied lm_head once). FLOPs per token count 2 per multiply-add of every projection
and the lm_head, plus attention scores and context at --context positions
(4 x heads x head_dim x context per layer).

Which of A's layers B lost is read from B's metadata (the drop-layers records in
pangu_light.pass_stats written after A's own records). When it cannot be told (B was not
compiled from A, or the records are missing), layers are shown by position and only the
difference in count is reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.analysis.graph_stats import DEFAULT_CONTEXT, GraphStats, LayerStats
from pangu_light.passes.infra.graph_io import load_model
from pangu_light.reports.table import format_table

__all__ = ["HELP", "add_arguments", "run", "diff_stats", "format_diff", "match_layers"]

HELP = "compare two graphs: parameters, FLOPs, per-layer shapes, tagged nodes"

_SHAPE_KEYS = ("num_heads", "num_kv_heads", "head_dim", "intermediate_size", "hidden_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, metavar="A.onnx", help="the graph before (e.g. the export)")
    parser.add_argument("b", type=Path, metavar="B.onnx", help="the graph after (e.g. the compiled one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT, metavar="N",
        help=f"attention length for FLOPs and decode bytes per token (default {DEFAULT_CONTEXT})",
    )


def run(args: argparse.Namespace) -> int:
    if args.context < 1:
        raise PanguLightError(f"--context must be a positive number of positions, got {args.context}")
    stats_a = GraphStats.from_model(load_model(args.a), context=args.context)
    stats_b = GraphStats.from_model(load_model(args.b), context=args.context)
    diff = diff_stats(stats_a, stats_b, name_a=str(args.a), name_b=str(args.b))
    print(json.dumps(diff, indent=2) if args.json else format_diff(diff))
    return 0


# --------------------------------------------------------------------------- layer matching
def match_layers(a: GraphStats, b: GraphStats) -> tuple[list[int | None] | None, str]:
    """For each of B's layers, the index of A's layer it came from; and how that was told.

    Returns ``(None, reason)`` when it cannot be told. Uses B's ``drop-layers`` records that
    follow A's own pass records (each lists the indices it removed, numbered as the model
    was when that pass ran); with no such records and equal counts, layers match by index.
    """
    if b.pass_stats[: len(a.pass_stats)] != a.pass_stats:
        new_records = None
    else:
        new_records = b.pass_stats[len(a.pass_stats):]
    drops = [r for r in (new_records or []) if r.get("pass") == "drop-layers" and r.get("modified")]
    if new_records is not None and drops:
        origin = list(range(a.num_layers))
        for record in drops:
            removed = (record.get("stats") or {}).get("removed")
            if not isinstance(removed, list) or not all(isinstance(i, int) and 0 <= i < len(origin) for i in removed):
                return None, "B's drop-layers record does not list the removed layers"
            origin = [o for i, o in enumerate(origin) if i not in set(removed)]
        if len(origin) == b.num_layers:
            return origin, "B's drop-layers records"
        return None, "B's drop-layers records do not account for B's layer count"
    if a.num_layers == b.num_layers:
        return list(range(b.num_layers)), "same number of layers"
    if new_records is None:
        return None, "B's pass records do not continue A's (B was not compiled from A)"
    return None, "B's metadata records no drop-layers pass"


# --------------------------------------------------------------------------- the diff
def _pair(a: int | float | None, b: int | float | None) -> dict[str, Any]:
    ratio = None if not a or b is None else b / a
    return {"a": a, "b": b, "difference": None if a is None or b is None else b - a, "ratio": ratio}


def _layer_json(layer: LayerStats | None) -> dict[str, Any] | None:
    if layer is None:
        return None
    return {**layer.shape(), "parameters": layer.parameters, "flops_per_token": layer.flops_per_token}


def diff_stats(a: GraphStats, b: GraphStats, name_a: str = "A", name_b: str = "B") -> dict[str, Any]:
    """The comparison of two graphs' stats as one JSON-ready dict (what ``--json`` prints)."""
    origin, how = match_layers(a, b)
    rows = []
    if origin is not None:
        b_of = {o: j for j, o in enumerate(origin)}
        for i, layer_a in enumerate(a.layers):
            j = b_of.get(i)
            layer_b = b.layers[j] if j is not None else None
            rows.append({"a_index": i, "b_index": j, "a": _layer_json(layer_a), "b": _layer_json(layer_b)})
        removed = [i for i in range(a.num_layers) if i not in b_of]
    else:
        for k in range(max(a.num_layers, b.num_layers)):
            layer_a = a.layers[k] if k < a.num_layers else None
            layer_b = b.layers[k] if k < b.num_layers else None
            rows.append({
                "a_index": k if layer_a else None, "b_index": k if layer_b else None,
                "a": _layer_json(layer_a), "b": _layer_json(layer_b),
            })
        removed = None
    for row in rows:
        row["changed"] = [
            key for key in (*_SHAPE_KEYS, "parameters")
            if row["a"] is None or row["b"] is None or row["a"][key] != row["b"][key]
        ] if row["a"] and row["b"] else []

    ops = sorted(set(a.op_counts) | set(b.op_counts))
    b_json = b.to_json()
    return {
        "a": name_a,
        "b": name_b,
        "context": a.context,
        "family": {"a": a.family, "b": b.family},
        "tied_embeddings": {"a": a.tied_embeddings, "b": b.tied_embeddings},
        "parameters": _pair(a.total_parameters, b.total_parameters),
        "parameter_parts": {
            "embedding": _pair(a.embedding_parameters, b.embedding_parameters),
            "layers": _pair(a.layer_parameters, b.layer_parameters),
            "final_norm": _pair(a.final_norm_parameters, b.final_norm_parameters),
            "lm_head": _pair(a.lm_head_parameters, b.lm_head_parameters),
        },
        "flops_per_token": _pair(a.flops_per_token, b.flops_per_token),
        "flops_parts": {
            "projections": _pair(a.projection_flops, b.projection_flops),
            "lm_head": _pair(a.lm_head_flops, b.lm_head_flops),
            "attention": _pair(a.attention_flops, b.attention_flops),
        },
        "bytes_per_token_decode": _pair(
            a.bytes_per_token_decode().total_bytes, b.bytes_per_token_decode().total_bytes
        ),
        "hidden_size": _pair(a.hidden_size, b.hidden_size),
        "vocab_size": _pair(a.vocab_size, b.vocab_size),
        "num_layers": _pair(a.num_layers, b.num_layers),
        "layers": {"matched_by": how if origin is not None else None,
                   "unmatched_reason": None if origin is not None else how,
                   "removed": removed, "rows": rows},
        "op_counts": {
            op: {"a": a.op_counts.get(op, 0), "b": b.op_counts.get(op, 0),
                 "difference": b.op_counts.get(op, 0) - a.op_counts.get(op, 0)}
            for op in ops if a.op_counts.get(op, 0) != b.op_counts.get(op, 0)
        },
        "tagged_nodes_b": b_json["tagged_nodes"],
        "tagged_initializers_b": b_json["tagged_initializers"],
        "pipeline_b": b.pipeline,
        "pass_stats_b": b.pass_stats,
    }


# --------------------------------------------------------------------------- the table
def _num(value: int | float | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ratio(pair: dict[str, Any]) -> str:
    return "-" if pair["ratio"] is None else f"{pair['ratio']:.4f}"


def _layer_cells(layer: dict[str, Any] | None) -> list[str]:
    if layer is None:
        return [""] * 5
    keys = ("num_heads", "num_kv_heads", "head_dim", "intermediate_size")
    return [str(layer[key]) for key in keys] + [f"{layer['parameters']:,}"]


def format_diff(diff: dict[str, Any]) -> str:
    """The readable form of ``diff_stats``' result."""
    tied = diff["tied_embeddings"]
    lines = [
        f"A: {diff['a']}  ({diff['family']['a'] or '?'}, embeddings {'tied' if tied['a'] else 'untied'})",
        f"B: {diff['b']}  ({diff['family']['b'] or '?'}, embeddings {'tied' if tied['b'] else 'untied'})",
        "",
    ]
    rows = [("", "A", "B", "B/A")]

    def add(label: str, pair: dict[str, Any]) -> None:
        rows.append((label, _num(pair["a"]), _num(pair["b"]), _ratio(pair)))

    add("parameters", diff["parameters"])
    for part, pair in diff["parameter_parts"].items():
        add(f"  {part}", pair)
    add(f"FLOPs/token (context {diff['context']})", diff["flops_per_token"])
    for part, pair in diff["flops_parts"].items():
        add(f"  {part}", pair)
    add("decode bytes/token", diff["bytes_per_token_decode"])
    add("hidden size", diff["hidden_size"])
    add("vocab size", diff["vocab_size"])
    add("layers", diff["num_layers"])
    lines.append(format_table(rows))

    layers = diff["layers"]
    lines.append("")
    if layers["matched_by"] is not None:
        removed = layers["removed"]
        lines.append(
            f"per layer (B's layers matched to A's by {layers['matched_by']}; "
            f"removed from A: {', '.join(map(str, removed)) if removed else 'none'})"
        )
    else:
        count = diff["num_layers"]["a"] - diff["num_layers"]["b"]
        lines.append(
            f"per layer, by position: cannot tell which layers were removed ({layers['unmatched_reason']}); "
            f"A has {diff['num_layers']['a']}, B {diff['num_layers']['b']} "
            f"({count:+d} removed)" if count >= 0 else
            f"per layer, by position: cannot tell how B's layers relate to A's "
            f"({layers['unmatched_reason']}); A has {diff['num_layers']['a']}, B {diff['num_layers']['b']}"
        )
    head = ("heads", "kv", "hd", "ffn", "params")
    table = [("A", *head, "|", "B", *head, "changed")]
    for row in layers["rows"]:
        a_idx = "" if row["a_index"] is None else str(row["a_index"])
        if row["b"] is None and row["a"] is not None and layers["matched_by"] is not None:
            right = ["", "removed", "", "", "", ""]
        else:
            right = ["" if row["b_index"] is None else str(row["b_index"]), *_layer_cells(row["b"])]
        changed = " ".join(_short(k) for k in row["changed"])
        table.append((a_idx, *_layer_cells(row["a"]), "|", *right, changed))
    lines.append(format_table(table, align="rrrrrrlrrrrrrl", gap=" "))

    lines.append("")
    if diff["op_counts"]:
        lines.append("op counts (A -> B): " + ", ".join(
            f"{op} {c['a']} -> {c['b']} ({c['difference']:+d})" for op, c in diff["op_counts"].items()
        ))
    else:
        lines.append("op counts: the same")
    lines.append(f"pipeline of B: {diff['pipeline_b'] or '(none recorded)'}")
    for kind in ("nodes", "initializers"):
        counts = diff[f"tagged_{kind}_b"]
        text = ", ".join(f"{p} {n}" for p, n in counts.items()) if counts else "none"
        lines.append(f"tagged {kind} in B: {text}")
    return "\n".join(lines)


def _short(key: str) -> str:
    return {"num_heads": "heads", "num_kv_heads": "kv", "head_dim": "hd", "intermediate_size": "ffn",
            "hidden_size": "hidden", "parameters": "params"}[key]
