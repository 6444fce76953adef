"""What ``plan`` and ``prune`` print: the plan in four lines, and the before/after table."""

from __future__ import annotations

from typing import Any

from pangu_light.reports.table import format_table

__all__ = ["describe_plan", "summary_table"]


def describe_plan(plan) -> str:
    """Parameters, widths and options of a ``passes.infra.plan.PrunePlan`` (its ``estimate``)."""
    e = plan.estimate
    lines = [
        f"parameters {e['parameters_before']:,} -> {e['parameters_after']:,} ({e['parameter_ratio']:.3f})",
        f"hidden {plan.hidden_size} -> {e['hidden']}; layers {len(plan.shapes)} -> {e['layers']}"
        + (f" (drop {plan.drop_layers})" if plan.drop_layers else ""),
        f"heads per group -> {e['heads_per_group']}; KV groups -> {e['kv_groups']}; FFN -> {e['ffn']}",
        f"hidden by {plan.hidden_method}; "
        # a rotate plan corrects each norm itself (calib.rotation); SLNP does not apply to it
        + (f"SLNP {'on' if plan.slnp else 'off'}; " if plan.hidden_method != "rotate" else "")
        + f"CLAP {'on' if plan.clap else 'off'}"
        + (f"; spread {plan.targets['spread']}" if plan.targets.get("params") is not None else "")
        + (f"; absorb {len(plan.post_norm_s_inv)} post-norms" if plan.absorb_post_norms else ""),
    ]
    return "\n".join(lines)


def summary_table(summary: dict[str, Any]) -> str:
    """The original and pruned graphs of a ``prune`` summary.json side by side, with ratios."""
    graphs = summary["graphs"]
    o, p = graphs["original"], graphs["pruned"]
    rows: list[tuple[str, ...]] = [("", "original", "pruned", "ratio")]

    def row(label: str, key: str, fmt: str) -> None:
        if key in o and key in p:
            rows.append((label, format(o[key], fmt), format(p[key], fmt), f"{p[key] / o[key]:.3f}"))

    row("parameters", "parameters", ",")
    row("FLOPs/token", "flops_per_token", ",")
    row("layers", "layers", "d")
    row("hidden size", "hidden_size", "d")
    evaluation = summary["evaluation"]
    if not evaluation:
        return format_table(rows)
    row("perplexity", "perplexity", ".2f")
    return (
        f"{format_table(rows)}\n(perplexity on {evaluation['data']!r}, eval split, "
        f"{evaluation['samples']} x {evaluation['seq_len']} tokens)"
    )
