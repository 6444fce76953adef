"""The ``pangu-light`` command: one sub-command per stage, each in its own module.

Every stage reads and writes files, so each can be run, inspected and cached alone:

    prune      the whole job: export, calibrate, plan, compile, refit, evaluate -> OUTDIR
    export     HF model -> clean ONNX graph (no-cache or decode)
    inspect    print the model map derived from a graph
    calibrate  graph + text -> importance statistics (stats.npz)
    plan       statistics + targets -> prune plan (plan.json)
    compile    run a pipeline of rewrite passes (or a plan) over a graph
    eval       perplexity on held-out text, or zero-shot task accuracy (--tasks)
    deploy     a deployment graph: weights folded for MatMul, int8/int4 weight-only quantisation
    diff       compare two graphs: parameters, FLOPs, per-layer shapes, tagged nodes
    run        greedy generation with a decode graph under ONNX Runtime
    bench      measure graphs side by side: prefill, decode tokens/s, throughput vs ideal
    search     choose the pruned shape by measured speed and a KL quality proxy
    distill    recover a pruned graph by distillation from the unpruned model, re-export it

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pangu_light.core.errors import PanguLightError
from pangu_light.runtime.errors import RuntimeUserError

__all__ = ["main"]

# Explicit table: a command exists because it is listed here, not because a module was imported.
COMMANDS: dict[str, str] = {
    "prune": "pangu_light.tools.prune_cmd",
    "export": "pangu_light.tools.export_cmd",
    "inspect": "pangu_light.tools.inspect_cmd",
    "calibrate": "pangu_light.tools.calibrate_cmd",
    "plan": "pangu_light.tools.plan_cmd",
    "compile": "pangu_light.tools.compile_cmd",
    "eval": "pangu_light.tools.eval_cmd",
    "diff": "pangu_light.tools.diff_cmd",
    "run": "pangu_light.tools.run_cmd",
    "bench": "pangu_light.tools.bench_cmd",
    "distill": "pangu_light.tools.distill_cmd",
    "recover": "pangu_light.tools.recover_cmd",
    "deploy": "pangu_light.tools.deploy_cmd",
    "search": "pangu_light.tools.search_cmd",
}

USER_ERRORS = (PanguLightError, RuntimeUserError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pangu-light",
        description=(
            "Prune and accelerate decoder-only LLMs by rewriting their exported ONNX graphs "
            "(Pangu Light: weight re-initialization for pruning, arXiv 2505.20155)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `pangu-light COMMAND --help` for the options of one command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pangu-light inspect model.onnx | head`: the reader left early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
