"""The paper's tables regenerated on the models this project ships (scaffolding: Table 3 only).

    python benchmarks/paper_tables.py table3 -o results/ [--model smollm2-135m] [--params 0.6]
        [--drop-layers 8] [--calib-samples 64] [--seq-len 256] [--eval-samples 32]
        [--tasks lambada,hellaswag,piqa,winogrande,arc_easy,sciq] [--limit 500] [--threads N]

Table 3 analogue (paper section 4.3: Minitron-style pruning, then CLAP, then SLNP), one shape with
width and depth removed together at about ``--params`` of the parameters, before recovery:

    row              plan (calib.planner.Targets)                          the paper's method
    unpruned         -                                                     -
    minitron         params=P, drop_layers=N, clap=False, slnp=False       same statistics, plain slicing,
                                                                           plain layer removal
    +CLAP            params=P, drop_layers=N, clap=True,  slnp=False       3.2.1, eq. 5
    +CLAP+SLNP       params=P, drop_layers=N, clap=True,  slnp=True        3.2.2, eq. 6

Stages, each the CLI's (through the functions behind it): ``pangu-light export MODEL`` (no-cache
graph), ``calibrate --data wiki`` (one set of statistics for every row), ``plan`` + ``compile
--plan`` per row, then per graph the held-out perplexity (``eval --data lambada``: the same
token windows for every graph) and the zero-shot task accuracies (``eval --tasks``: the same
items for every graph, lm-eval-harness scoring, calib/scoring.py). Writes to ``-o``:

    table3.md    the table (parameters, perplexity, accuracy ± stderr) with the command, machine,
                 library versions and time
    table3.json  every number: plans, parameter counts, perplexities, lm-eval layout per graph
    plan-*.json  the plans (the graphs go to ``--workdir``, deleted unless ``--keep``)

Not yet: recovery (the same distillation budget after pruning, ``benchmarks/distill.py``) and a
row for the project's best re-initialisation; Table 4 and Figures 2 and 3.

The real run (SmolLM2-135M, 30 layers): the command above with its defaults. Not run yet. Time,
from a measurement of the task scoring: the unpruned graph scored the first 20 items of every
task (340 requests) in under 4 minutes of wall time on the shared 2-core machine at load 6-8
(`pangu-light eval ... --limit 20`, about half a core for the job). At --limit 500 that is about
8,500 requests per graph, so roughly 35 minutes per graph on a quiet 2-core machine and over an
hour at that load: 2.5 to 5 hours for the four graphs, plus a few minutes for export,
calibration and compiling. Use --limit 100 for a first look (about 30 minutes in all).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROWS = {  # row -> the Targets fields beyond the shared params / drop_layers
    "minitron": {"clap": False, "slnp": False},
    "+CLAP": {"clap": True, "slnp": False},
    "+CLAP+SLNP": {"clap": True, "slnp": True},
}
DEFAULT_TASKS = "lambada,hellaswag,piqa,winogrande,arc_easy,sciq"


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import numpy
    import onnxruntime
    import torch
    import transformers

    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def export(model: str, path: Path) -> Path:
    from pangu_light.tools.cli import main as cli

    if not path.exists():
        note(f"pangu-light export {model} -o {path}")
        if cli(["export", model, "-o", str(path), "--quiet"]) != 0:
            raise SystemExit(f"export of {model} failed")
    return path


def compile_plan(graph: Path, plan, out: Path) -> None:
    import onnx_ir as ir

    from pangu_light.passes.infra.manager import run_pipeline

    model = ir.load(graph)
    plan.attach(model)
    run_pipeline(model, plan.pipeline())
    ir.save(model, out)


def table3(args: argparse.Namespace) -> dict:
    import onnx_ir as ir

    from pangu_light.calib.calibrate import calibrate_graph
    from pangu_light.calib.evaluate import perplexity
    from pangu_light.calib.planner import Targets, make_plan
    from pangu_light.calib.scoring import score_items
    from pangu_light.calib.task_report import model_report
    from pangu_light.calib.tasks import load_task, parse_tasks
    from pangu_light.calib.text import graph_tokenizer, sequences_for
    from pangu_light.frontend.task_scoring import model_encoder, open_model
    from pangu_light.passes.analysis.graph_stats import GraphStats
    from pangu_light.passes.analysis.model_map import ModelMap
    from pangu_light.passes.infra.graph_io import load_model_metadata

    chosen = parse_tasks(args.tasks)
    task_items = {task: load_task(task, args.limit) for task in chosen}
    original = export(args.model, args.workdir / "orig.onnx")
    note(f"pangu-light calibrate {original.name} --data wiki --samples {args.calib_samples} --seq-len {args.seq_len}")
    stats = calibrate_graph(original, data="wiki", samples=args.calib_samples, seq_len=args.seq_len, seed=0,
                            batch_size=4, threads=args.threads, quiet=True)
    encode_ppl, bos = graph_tokenizer(original, load_model_metadata(original), None)
    windows = sequences_for(args.eval_data, encode_ppl, bos, samples=args.eval_samples, seq_len=args.seq_len,
                            seed=0, split="eval")
    encode = model_encoder(open_model(str(original), threads=args.threads))
    graphs = {"unpruned": (original, None)}
    for row, fields in ROWS.items():
        targets = Targets(params=args.params, drop_layers=args.drop_layers, **fields)
        plan = make_plan(ModelMap.from_model(ir.load(original)), stats, targets)
        plan.save(args.output / f"plan-{_slug(row)}.json")
        out = args.workdir / f"{_slug(row)}.onnx"
        note(f"{row}: drop layers {plan.drop_layers}, compiling {out.name}")
        compile_plan(original, plan, out)
        graphs[row] = (out, targets.to_json())
    total = GraphStats.from_model(ir.load(original)).total_parameters
    rows = {}
    for row, (graph, targets) in graphs.items():
        note(f"{row}: perplexity and tasks")
        parameters = GraphStats.from_model(ir.load(graph)).total_parameters
        ppl = perplexity(graph, windows, batch_size=4, threads=args.threads)
        opened = open_model(str(graph), threads=args.threads)
        results = score_items(task_items, opened.logits, encode, metrics=chosen, max_length=opened.max_length,
                              batch_size=args.batch_size, progress=not args.quiet, label=row)
        rows[row] = {"targets": targets, "parameters": parameters, "parameter_fraction": parameters / total,
                     "perplexity": ppl.to_json(),
                     "lm_eval": model_report(results, task_items, {"model": str(graph), "backend": "onnxruntime",
                                                                   "limit": args.limit})}
        if graph != original and not args.keep:
            os.remove(graph)
    return {"rows": rows, "eval": {"data": args.eval_data, "samples": int(len(windows)), "seq_len": args.seq_len},
            "calibration": dict(stats.meta)}


def _slug(row: str) -> str:
    return row.strip("+").replace("+", "-").lower()


def table3_markdown(report: dict, args: argparse.Namespace) -> str:
    from pangu_light.calib.scoring import markdown_table
    from pangu_light.reports.machine import format_machine
    from pangu_light.runtime.machine import describe_machine

    rows = report["rows"]
    tasks = markdown_table({row: r["lm_eval"]["results"] for row, r in rows.items()}).splitlines()
    header = ["| row | parameters | held-out perplexity" + tasks[0].removeprefix("| model"), tasks[1] + "---|---|"]
    body = []
    for line, (row, r) in zip(tasks[2:], rows.items(), strict=True):
        share, ppl = 100 * r["parameter_fraction"], r["perplexity"]["perplexity"]
        cells = f"| {row} | {r['parameters']:,} ({share:.1f}%) | {ppl:.2f} |"
        body.append(cells + line.removeprefix(f"| {row} |"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    ev, version_text = report["eval"], ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    return "\n".join([
        f"## Table 3 analogue: {args.model} at {args.params} of the parameters, {args.drop_layers} layers removed, "
        "before recovery", "",
        f"- command: `{report['command']}`",
        f"- machine: {format_machine(describe_machine())}; load average at the end {load}",
        f"- versions: {version_text}",
        f"- calibration: {report['calibration']}; perplexity: {ev['samples']} x {ev['seq_len']} tokens of "
        f"{ev['data']} (eval split); tasks: first {args.limit or 'all'} items of each, zero-shot, "
        "accuracy ± stderr in %",
        f"- time: {report['seconds']:.0f} s", "",
        *header, *body, "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["table3"], help="which table (only table3 so far)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the tables and plans")
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF directory (default smollm2-135m)")
    parser.add_argument("--workdir", type=Path, help="where the graphs go (default OUTPUT/work)")
    parser.add_argument("--params", type=float, default=0.6, help="fraction of the parameters kept (default 0.6)")
    parser.add_argument("--drop-layers", type=int, default=8, help="layers removed (default 8 of 30)")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--eval-data", default="lambada", help="perplexity text (default lambada, eval split)")
    parser.add_argument("--eval-samples", type=int, default=32, help="perplexity windows (default 32)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"eval --tasks names (default {DEFAULT_TASKS})")
    parser.add_argument("--limit", type=int, default=500, help="first N items of each task (default 500)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward call (default 8)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--keep", action="store_true", help="keep the pruned graphs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir or args.output / "work"
    args.workdir.mkdir(parents=True, exist_ok=True)

    from pangu_light.core.files import write_json, write_text

    started = time.perf_counter()
    report = table3(args)
    report["seconds"] = time.perf_counter() - started
    report["command"] = " ".join(shlex.quote(part) for part in ["python", "benchmarks/paper_tables.py",
                                                                   *(sys.argv[1:] if argv is None else argv)])
    report["versions"] = versions()
    write_json(args.output / "table3.json", report)
    markdown = table3_markdown(report, args)
    write_text(args.output / "table3.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
