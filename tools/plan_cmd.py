"""Turn calibration statistics and targets into a prune plan (a readable JSON file).

    pangu-light plan stats.npz --hidden 448 --heads-per-group 2 --ffn 1152 -o plan.json
    pangu-light plan stats.npz --params 0.6 --uniform --align 32 -o plan.json
    pangu-light plan stats.npz --drop-layers 6 --clap -o plan.json

Targets name what survives: the hidden size, query heads per KV group, KV groups per layer,
the FFN width (one number for every layer, or a comma-separated list with one per layer), and
the number of layers to drop (lowest Block Influence first) or exactly which (--layers).
--params F instead keeps a fraction F of the parameters and lets the planner choose the
widths nobody gave (within 1%). The plan names every kept index (in the original model's
numbering), the layers to drop, where each dropped layer's KV groups merge (--clap), the
SLNP scales and the post-norm s_inv; `pangu-light compile --plan plan.json` carries it out.

The graph is the one the statistics were computed on (recorded in stats.npz); --model
overrides it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.tools.io import load_model, refuse_overwrite_input

__all__ = ["HELP", "add_arguments", "add_target_arguments", "run", "targets_from_args"]

HELP = "turn statistics and targets (or a parameter budget) into a prune plan (-> plan.json)"


def _int_or_list(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _int_list(text: str) -> list[int]:
    value = _int_or_list(text)
    return value if isinstance(value, list) else [value]


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("targets (what survives)")
    group.add_argument("--hidden", type=int, help="kept hidden size (channels ranked by S_channel)")
    group.add_argument("--heads-per-group", type=_int_or_list, metavar="N[,N...]", help="query heads kept in each KV group")
    group.add_argument("--kv-groups", type=_int_or_list, metavar="N[,N...]", help="KV groups kept per layer")
    group.add_argument("--ffn", type=_int_or_list, metavar="N[,N...]", help="FFN width kept per layer")
    group.add_argument("--drop-layers", type=int, metavar="N", help="drop the N layers with the lowest Block Influence")
    group.add_argument("--layers", type=_int_list, metavar="I,J,...", help="drop exactly these layers")
    group.add_argument("--params", type=float, metavar="F", help="keep a fraction F of the parameters; the planner picks the widths")
    group.add_argument("--uniform", action="store_true", help="the same shape in every layer (a standard Hugging Face config)")
    group.add_argument("--align", type=int, default=1, metavar="N", help="round kept hidden/FFN widths to multiples of N")
    group.add_argument("--clap", action="store_true", help="merge each dropped layer's best KV groups into its neighbour (CLAP)")
    group.add_argument(
        "--clap-groups", default="keep", metavar="keep|sum|N",
        help="KV groups of a layer after a CLAP merge: keep its own count (default), sum (all candidates), or N",
    )
    group.add_argument("--clap-margin", type=float, default=1.0, metavar="F",
                       help="a merged group must outscore the receiver's own by this factor (DESIGN.md variant; default 1)")
    group.add_argument("--clap-adjacent", action="store_true",
                       help="merge only a removed layer directly after its receiver; others are plainly removed")
    group.add_argument("--no-slnp", action="store_true", help="do not rescale pruned norm gammas (ablation)")
    group.add_argument("--absorb-post-norms", action="store_true", help="fold post-norms into o_proj/down_proj (sandwich models)")


def targets_from_args(args: argparse.Namespace):
    from pangu_light.calib.planner import Targets

    return Targets(
        hidden=args.hidden, heads_per_group=args.heads_per_group, kv_groups=args.kv_groups, ffn=args.ffn,
        drop_layers=args.drop_layers, layers=args.layers, params=args.params, uniform=args.uniform,
        align=args.align, clap=args.clap, slnp=not args.no_slnp, absorb_post_norms=args.absorb_post_norms,
        clap_groups=_clap_groups(args.clap_groups), clap_margin=args.clap_margin, clap_adjacent=args.clap_adjacent,
    )


def _clap_groups(text: str) -> int | str:
    if text in ("keep", "sum"):
        return text
    try:
        return int(text)
    except ValueError:
        raise PanguLightError(f"--clap-groups {text!r}: use keep, sum or a number of KV groups") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stats", type=Path, help="statistics from `pangu-light calibrate` (.npz)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output plan (.json)")
    parser.add_argument("--model", type=Path, help="the graph the statistics describe (default: recorded in the stats)")
    add_target_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pangu_light.calib.planner import make_plan
    from pangu_light.calib.stats import CalibrationStats
    from pangu_light.core.paths import record_path
    from pangu_light.passes.analysis.model_map import ModelMap

    stats = CalibrationStats.load(args.stats)
    model_path = args.model or (Path(stats.meta["graph"]) if stats.meta.get("graph") else None)
    if model_path is None or not model_path.is_file():
        raise PanguLightError(
            f"the graph the statistics were computed on ({model_path or 'not recorded'}) is not there; "
            "pass it with --model"
        )
    refuse_overwrite_input(args.output, args.stats, model_path)
    model_map = ModelMap.from_model(load_model(model_path))
    plan = make_plan(model_map, stats, targets_from_args(args))
    plan.source["graph"] = record_path(model_path, args.output)
    plan.save(args.output)
    print(describe_plan(plan))
    print(f"wrote {args.output}")
    return 0


def describe_plan(plan) -> str:
    e = plan.estimate
    lines = [
        f"parameters {e['parameters_before']:,} -> {e['parameters_after']:,} ({e['parameter_ratio']:.3f})",
        f"hidden {plan.hidden_size} -> {e['hidden']}; layers {len(plan.shapes)} -> {e['layers']}"
        + (f" (drop {plan.drop_layers})" if plan.drop_layers else ""),
        f"heads per group -> {e['heads_per_group']}; KV groups -> {e['kv_groups']}; FFN -> {e['ffn']}",
        f"SLNP {'on' if plan.slnp else 'off'}; CLAP {'on' if plan.clap else 'off'}"
        + (f"; absorb {len(plan.post_norm_s_inv)} post-norms" if plan.absorb_post_norms else ""),
    ]
    return "\n".join(lines)
