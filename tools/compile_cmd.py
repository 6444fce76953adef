"""Run a pipeline of rewrite passes over an ONNX graph and write the result.

A pipeline is one line: passes separated by commas, each with optional options in braces,
run left to right:

    pangu-light compile model.onnx -o pruned.onnx \\
        --pipeline "drop-layers{layers=[12,13,14]},slice-hidden{keep_first=448}"

Pass names are kebab-case; options are key=value pairs separated by commas. Values are
integers (448), floats (0.5), booleans (true/false), words (name) or "quoted strings", and
lists in brackets ([3,7], [[0,1],[2,3]]). Spaces are allowed and ignored. Unknown passes and
options are errors; `--list-passes` prints the passes and their options.

With --plan plan.json (from `pangu-light plan`) the pipeline comes from the plan: it is
recorded in the graph's metadata (pangu_light.plan) and its passes run with plan=true,
reading their decisions from it:

    pangu-light compile model.onnx --plan plan.json -o pruned.onnx

The canonical pipeline text and each pass's counts are written into the output model's
metadata (pangu_light.pipeline, pangu_light.pass_stats). The input is never overwritten, and
a failed run leaves no output file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra import registry
from pangu_light.passes.infra.graph_io import load_model, refuse_overwrite_input, save_model_atomic
from pangu_light.passes.infra.manager import run_pipeline
from pangu_light.passes.infra.pipeline import Pipeline
from pangu_light.passes.infra.plan import load_plan

__all__ = ["HELP", "add_arguments", "run"]

HELP = "run a pipeline of rewrite passes over a graph"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", type=Path, help="input .onnx graph")
    parser.add_argument("-o", "--output", type=Path, help="output .onnx path (never the input)")
    parser.add_argument(
        "-p", "--pipeline", help='pipeline text, e.g. "drop-layers{layers=[3,7]},slice-hidden{keep_first=448}"'
    )
    parser.add_argument("--plan", type=Path, help="a plan from `pangu-light plan`: run the passes that carry it out")
    parser.add_argument("--no-slnp", action="store_true", help="with --plan: leave out SLNP (ablation)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the graph (ONNX checker + strict shape inference) before the first pass and after every "
        "pass that changed it",
    )
    parser.add_argument(
        "--dump-after-change",
        metavar="DIR",
        type=Path,
        help="write the graph after every pass that changed it to DIR/NN-passname.onnx",
    )
    parser.add_argument(
        "--list-passes", action="store_true", help="list the registered passes and their options, then exit"
    )
    parser.add_argument("--progress", action="store_true", help="print a line to stderr as each pass starts and ends")


def list_passes() -> str:
    lines = []
    for name in registry.available_passes():
        try:
            options = registry.get_pass(name).describe_options()
        except PanguLightError as error:
            options = f"(unavailable: {error})"
        lines.append(f"{name}\n    options: {options}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.list_passes:
        print(list_passes())
        return 0
    missing = [flag for flag, value in (("MODEL", args.model), ("-o OUTPUT", args.output)) if value is None]
    if (args.pipeline is None) == (args.plan is None):
        missing.append("one of --pipeline or --plan")
    if missing:
        raise PanguLightError(
            f"compile needs {', '.join(missing)}; e.g. `pangu-light compile model.onnx "
            '--pipeline "drop-layers{layers=[3]}" -o out.onnx`'
        )
    refuse_overwrite_input(args.output, args.model, *([args.plan] if args.plan else []))
    plan = None
    if args.plan is not None:
        plan = load_plan(args.plan)
        pipeline = plan.pipeline(slnp=False if args.no_slnp else None)
    else:
        pipeline = Pipeline.parse(args.pipeline)
    # Build every pass before loading the graph, so option errors come back at once.
    for spec in pipeline:
        registry.build_pass(spec)
    model = load_model(args.model)
    if plan is not None:
        plan.attach(model)
        print(f"plan {args.plan}: {pipeline}")

    after_change = None
    if args.dump_after_change is not None:
        dump_dir: Path = args.dump_after_change
        refuse_overwrite_input(dump_dir, args.model)

        def after_change(index: int, name: str, model_now) -> None:
            path = dump_dir / f"{index + 1:02d}-{name}.onnx"
            save_model_atomic(model_now, path)
            if args.progress:
                print(f"    dumped {path}", file=sys.stderr)

    report = run_pipeline(model, pipeline, verify=args.verify, after_change=after_change, progress=args.progress)
    print(report)
    save_model_atomic(model, args.output)
    print(f"wrote {args.output}")
    return 0
