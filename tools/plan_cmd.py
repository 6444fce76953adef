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

--hidden-method rotate keeps the leading components of the residual stream's PCA basis instead of
channels (pre-norm families): the basis is read from --rotation, or computed on the graph over the
statistics' own calibration text and written beside the plan (PLAN-rotation.npz).

The graph is the one the statistics were computed on (recorded in stats.npz); --model
overrides it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra.graph_io import load_model, refuse_overwrite_input
from pangu_light.reports.prune import describe_plan
from pangu_light.tools.arguments import add_target_arguments, targets_from_args

__all__ = ["HELP", "add_arguments", "run"]

HELP = "turn statistics and targets (or a parameter budget) into a prune plan (-> plan.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stats", type=Path, help="statistics from `pangu-light calibrate` (.npz)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output plan (.json)")
    parser.add_argument("--model", type=Path, help="the graph the statistics describe (default: recorded in the stats)")
    add_target_arguments(parser)
    parser.add_argument(
        "--hidden-method", choices=("auto", "select", "rotate"), default="auto",
        help="keep the hidden channels with the highest S_channel (select) or the leading components of a "
        "rotation of the residual stream (rotate: pre-norm families; see `compile --list-passes`), or auto: "
        "rotate for pre-norm families when the hidden size is cut, select otherwise (default auto, as prune)",
    )
    parser.add_argument("--rotation", type=Path, help="with --hidden-method rotate: a rotation file to use")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from pangu_light.calib.budget import resolve_spread
    from pangu_light.calib.planner import make_plan
    from pangu_light.calib.rotation import resolve_hidden_method
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
    targets = targets_from_args(args)
    targets = dataclasses.replace(targets, hidden_method=resolve_hidden_method(args.hidden_method, model_map, targets),
                                  spread=resolve_spread(args.spread, targets, refit=False, probe=False))
    rotation, rotation_file = None, args.rotation
    if targets.hidden_method == "rotate":
        rotation, rotation_file = _rotation(args, stats, model_path)
    plan = make_plan(model_map, stats, targets, rotation=rotation,
                     rotation_file=None if rotation_file is None else str(rotation_file.resolve()))
    plan.source["graph"] = record_path(model_path, args.output)
    plan.save(args.output)
    print(describe_plan(plan))
    print(f"wrote {args.output}")
    return 0



def _rotation(args: argparse.Namespace, stats, model_path: Path):
    """The rotation given by --rotation, else computed over the statistics' calibration text."""
    from pangu_light.calib.rotation import collect_graph_rotation
    from pangu_light.passes.rewrites.rotate_hidden import load_rotation, save_rotation

    if args.rotation is not None:
        return load_rotation(args.rotation, "plan --rotation"), args.rotation
    meta = stats.meta
    missing = [key for key in ("data", "seq_len", "seed") if meta.get(key) is None]
    if missing:
        raise PanguLightError(f"the statistics do not record their calibration text ({', '.join(missing)}); "
                              "pass --rotation FILE")
    path = args.output.with_name(f"{args.output.stem}-rotation.npz")
    refuse_overwrite_input(path, args.stats, model_path)
    rotation = collect_graph_rotation(model_path, data=meta["data"], samples=meta.get("samples"),
                                      seq_len=int(meta["seq_len"]), seed=int(meta["seed"]), batch_size=4)
    save_rotation(path, rotation)
    print(f"wrote {path}")
    return rotation, path
