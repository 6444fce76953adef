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

