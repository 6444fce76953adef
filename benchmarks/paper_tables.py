"""The paper's tables and figures regenerated on the models this project ships, one command each.

    python benchmarks/paper_tables.py table3|table4|fig2|fig3|all -o results/ [options]

    experiment  module                       model (option)                     writes
    table3      benchmarks/paper_table3.py   --model (smollm2-135m)             table3.md/.json, plan-*.json
    table4      benchmarks/paper_table4.py   --gemma-model (gemma3-270m)        table4.md/.json
    fig2        benchmarks/paper_fig2.py     --model                            fig2.png/.md/.json
    fig3        benchmarks/paper_fig3.py     --gemma-model                      fig3.png/.md/.json

(each module's docstring says what its rows are). ``all`` runs fig3, table4, table3, fig2 in that
order (cheapest first). Every Markdown file starts with the command, the machine and its load
average, the library versions and the time; the JSON holds every number (lm-eval-harness layout
per graph under ``lm_eval``). Exports, statistics and graphs go to ``--workdir`` (default
OUTPUT/work; the exports are reused by later runs, pruned graphs deleted unless ``--keep``).

Budgets: ``--limit`` items per task (every graph scores the same items) and ``--recover-steps``
(or ``--recover-minutes``) of recovery per row (table3, table4; none by default). What ran on a
shared 2-core CPU without bfloat16 instructions (docs/results.md, each 15-30 minutes): 16-32
calibration windows, 8-16 perplexity windows, ``--limit 30-50``, ``--recover-with distill
--recover-steps 2-4 --recover-args=--no-bf16`` (distill's bf16 autocast is emulated there, about 7x
slower per step).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the experiment modules, when imported by path

import paper_common as common  # noqa: E402
import paper_fig2  # noqa: E402
import paper_fig3  # noqa: E402
import paper_table3  # noqa: E402
import paper_table4  # noqa: E402

EXPERIMENTS = {"fig3": paper_fig3, "table4": paper_table4, "table3": paper_table3, "fig2": paper_fig2}
DEFAULT_TASKS = "lambada,hellaswag,piqa,winogrande,arc_easy,sciq"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="which table or figure (all: every one)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the tables, plots and plans")
    p.add_argument("--model", default="smollm2-135m", help="table3 / fig2 model: alias or HF directory")
    p.add_argument("--gemma-model", default="gemma3-270m", help="table4 / fig3 model (a sandwich-norm family)")
    p.add_argument("--workdir", type=Path, help="exports, statistics and graphs (default OUTPUT/work)")
    shape = p.add_argument_group("shapes")
    shape.add_argument("--params", type=float, default=0.6, help="table3: fraction of the parameters kept (0.6)")
    shape.add_argument("--drop-layers", type=int, default=8, help="table3: layers removed (default 8 of 30)")
    shape.add_argument("--table3-rows", help=f"table3: these rows only (default {','.join(paper_table3.ROWS)})")
    shape.add_argument("--table4-rows", help=f"table4: these rows only (default {','.join(paper_table4.ROWS[1:])})")
    shape.add_argument("--table4-params", type=float, help="table4: prune to this fraction first (default: not)")
    shape.add_argument("--absorb-max-spread", type=float, default=0.15, help="table4 partial absorption (0.15)")
    shape.add_argument("--fig2-levels", default="0.8:4,0.6:8,0.45:12",
                       help="fig2: params:dropped-layers per level (default 0.8:4,0.6:8,0.45:12)")
    shape.add_argument("--fig2-methods", default="minitron,+CLAP+SLNP,prune-default",
                       help="fig2: table3 rows to compare (default minitron,+CLAP+SLNP,prune-default)")
    shape.add_argument("--fig3-params", type=float, default=0.7, help="fig3: width pruning (default 0.7)")
    data = p.add_argument_group("data and evaluation")
    data.add_argument("--calib-samples", type=int, default=64, help="calibration windows (wiki; default 64)")
    data.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    data.add_argument("--eval-data", default="lambada", help="perplexity text (default lambada, eval split)")
    data.add_argument("--eval-samples", type=int, default=32, help="perplexity windows (default 32)")
    data.add_argument("--tasks", default=DEFAULT_TASKS, help=f"eval --tasks names, '' for none ({DEFAULT_TASKS})")
    data.add_argument("--limit", type=int, default=500, help="first N items of each task (default 500)")
    data.add_argument("--batch-size", type=int, default=8, help="requests per forward call (default 8)")
    rec = p.add_argument_group("recovery (table3, table4)")
    rec.add_argument("--recover-minutes", type=float, default=0.0, help="wall-clock minutes per row (0: none)")
    rec.add_argument("--recover-steps", type=int, help="optimizer steps per row instead of --recover-minutes "
                     "(the same training for every row whatever the machine's load)")
    rec.add_argument("--recover-with", choices=("recover", "distill"), default="recover",
                     help="recover (local reconstruction, then KD; default) or distill (KD only)")
    rec.add_argument("--recover-args", help="more options for every recover/distill run, one string "
                     "(e.g. '--no-bf16' on a CPU without bfloat16 instructions)")
    rec.add_argument("--train-samples", type=int, default=256, help="training windows (wiki, calib split)")
    rec.add_argument("--recover-eval-samples", type=int, default=4, help="held-out windows the runs report")
    speed = p.add_argument_group("speed (fig2)")
    speed.add_argument("--latency-seq", type=int, default=128, help="tokens per timed forward (default 128)")
    speed.add_argument("--repeats", type=int, default=20, help="alternating timed rounds (default 20)")
    p.add_argument("--threads", type=int, help="ONNX Runtime / torch intra-op threads")
    p.add_argument("--keep", action="store_true", help="keep the pruned graphs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_one(name: str, args: argparse.Namespace, command: str) -> dict:
    module = EXPERIMENTS[name]
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    report, lines = module.run(args)
    report.update(command=command, versions=common.versions(), load_start=load_start,
                  seconds=time.perf_counter() - started, experiment=name)
    markdown = "\n".join([*common.header(module.TITLE, report, args), *lines])
    common.finish(name, report, markdown, args)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir or args.output / "work"
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(part) for part in ["python", "benchmarks/paper_tables.py",
                                                          *(sys.argv[1:] if argv is None else argv)])
    for name in EXPERIMENTS if args.experiment == "all" else [args.experiment]:
        run_one(name, args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
