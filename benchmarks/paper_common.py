"""What the paper experiments share (benchmarks/paper_table3.py, paper_table4.py, paper_fig2.py,
paper_fig3.py, run through benchmarks/paper_tables.py).

Every stage is the library function behind a CLI command, or the command itself (export in a
subprocess, recover/distill through ``pangu_light.tools.cli.main``; benchmarks import no command
module):

    export          pangu-light export MODEL -o orig.onnx                 (``export``; once per model)
    collect         calib.calibrate.collect_graph_all (wiki, calib split): statistics, and the
                    refit's Grams and the rotation when a row needs them, one pass (as ``prune``);
                    with prune's default sensitivity spread, the layer probe (calib.sensitivity_probe,
                    ``collect_for``), once: every row then gets the same widths
    build           plan -> compile -> refit_and_set (set-projection) -> save   (``prune``'s stages;
                    a row with CLAP and the refit first collects its CLAP receivers' moments,
                    calib.clap_refit: one more pass, of the probe graph, as ``prune`` does)
    score           held-out perplexity (calib.evaluate, eval split, the same windows for every
                    graph) and the zero-shot tasks (calib.scoring, the same items for every graph,
                    the first graph's tokenizer)                             (``eval`` / ``eval --tasks``)
    recover         pangu-light recover GRAPH --teacher MODEL --time-budget Ns (local reconstruction,
                    then KD; or ``distill``), the same budget for every row, one teacher cache
    latency         benchmarks/ort_latency.py --json: graphs run alternately in one process, medians

Every scored row is also appended to WORKDIR/scored-rows.jsonl as soon as it is known, so a run
that dies part-way (a killed process, a full disk) keeps what it measured.
``header`` records the command, machine, load average, library versions and time of a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import matplotlib
    import numpy
    import onnxruntime
    import torch
    import transformers

    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "matplotlib": matplotlib.__version__}


def cli() -> str:
    return str(Path(sys.executable).with_name("pangu-light"))


def export(model: str, path: Path) -> Path:
    """The no-cache graph of ``model`` at ``path`` (exported once, through the CLI)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        note(f"pangu-light export {model} -o {path}")
        subprocess.run([cli(), "export", model, "-o", str(path), "--quiet"], check=True, stdout=sys.stderr)
    return path


def collect(original: Path, args: argparse.Namespace, *, grams: bool = False, rotation: Path | None = None):
    """``calib.one_pass.Collected`` of ``original`` over ``--calib-samples`` wiki windows (calib split,
    seed 0): the statistics, and the refit's Gram matrices (``grams``) and the residual stream's
    rotation (saved at ``rotation``) when asked, from one tapped run, as ``prune`` collects them."""
    from pangu_light.calib.calibrate import collect_graph_all
    from pangu_light.passes.rewrites.rotate_hidden import save_rotation

    wanted = ["statistics", *(["Grams"] if grams else []), *(["rotation"] if rotation else [])]
    note(f"calibrate {original.name} --data wiki --samples {args.calib_samples} --seq-len {args.seq_len}: "
         f"{', '.join(wanted)} (one pass)")
    found = collect_graph_all(original, data="wiki", samples=args.calib_samples, seq_len=args.seq_len, seed=0,
                              batch_size=4, grams=grams, rotation=rotation is not None, threads=args.threads,
                              quiet=True)
    if rotation is not None:
        save_rotation(rotation, found.rotation)
    return found


def collect_for(original: Path, rows, args: argparse.Namespace, rotation: Path, model_map):
    """(``collect``'s result, the layer probe's ``LayerScales`` or None) for ``rows`` ((Targets, refit
    method or None) pairs): the Grams where a row refits or spreads by sensitivity, the rotation where
    a row rotates, and the probe (as ``prune`` runs it: its default probe windows) where a row still
    spreads by sensitivity after ``prune_spread``."""
    from pangu_light.calib.planner import reachable_spread
    from pangu_light.calib.sensitivity_probe import PROBE_SAMPLES, PROBE_SEQ_LEN, probe_layers

    rows = list(rows)
    sensitive = any(targets.spread == "sensitivity" for targets, _ in rows)
    collected = collect(original, args, grams=sensitive or any(refit for _, refit in rows),
                        rotation=rotation if any(t.hidden_method == "rotate" for t, _ in rows) else None)
    if not any(reachable_spread(model_map, collected.stats, t, "auto") == "sensitivity" for t, _ in rows):
        return collected, None
    note(f"layer probe of {original.name} (--spread sensitivity): first {PROBE_SEQ_LEN} tokens of "
         f"{PROBE_SAMPLES} calibration windows")
    probe = collected.sequences[:PROBE_SAMPLES, :PROBE_SEQ_LEN]
    return collected, probe_layers(original, collected.stats, collected.grams, probe, threads=args.threads)


def prune_spread(model_map, stats, targets):
    """``targets`` as ``prune`` plans them: its ``--spread auto`` spreads by hidden-light where the
    sensitivity spread cannot reach the budget (``calib.planner.reachable_spread``)."""
    from pangu_light.calib.planner import reachable_spread
    from pangu_light.calib.sensitivity import FLOORS

    spread = reachable_spread(model_map, stats, targets, "auto")
    if spread != targets.spread:
        note(f"--params {targets.params}: the sensitivity spread cannot reach it (it cuts {FLOORS}); {spread}, "
             "as prune does")
    return dataclasses.replace(targets, spread=spread)


def receiver_moments(original: Path, plan, sequences, args: argparse.Namespace):
    """``calib.clap_refit`` moments of ``plan``'s CLAP receivers on the calibration ``sequences``
    (``Collected.sequences``, in ``prune``'s default batches of 4), from one run of the probe graph;
    None where ``prune`` collects none (no CLAP, no foreign group merged, or post-norms absorbed)."""
    from pangu_light.calib.clap_refit import collect_receiver_moments, receiver_groups, receivers_to_refit
    from pangu_light.calib.stats import batched
    from pangu_light.passes.infra.graph_io import load_model

    if not receivers_to_refit(plan):
        return None
    note(f"CLAP receivers {sorted(receiver_groups(plan))}: moments of the probe graph (one more pass)")
    return collect_receiver_moments(load_model(original), plan, batched(sequences, 4), threads=args.threads)


def calibrate(original: Path, args: argparse.Namespace):
    """The calibration statistics of ``original`` alone (``collect`` without Grams or rotation)."""
    return collect(original, args).stats


def build(original: Path, plan, out: Path, *, grams=None, rotation=None, method: str = "refit",
          then: str | None = None, receivers=None, receiver_target: str = "next") -> None:
    """``compile --plan`` (then the pipeline ``then``) saved at ``out``; with ``grams``, first the refit
    of every pruned o_proj/down_proj by ``method`` in the basis the plan cut the hidden size in
    (``calib.refit_plan.refit_and_set``, the step ``prune`` runs; ``rotation``: the plan's), and with
    ``receivers`` (``receiver_moments``) that of the CLAP receivers' o_proj toward ``receiver_target``."""
    import onnx_ir as ir

    from pangu_light.calib.refit_plan import refit_and_set
    from pangu_light.passes.infra.manager import run_pipeline

    model = ir.load(original)
    plan.attach(model)
    if plan.pipeline().passes:  # an identity plan (no target) has nothing to run
        run_pipeline(model, plan.pipeline())
    if grams is not None:
        refit_and_set(ir.load(original), model, grams, plan, rotation=rotation, method=method,
                      receivers=receivers, receiver_target=receiver_target)
    if then:
        run_pipeline(model, then)
    ir.save(model, out)


def parameters(graph: Path) -> int:
    import onnx_ir as ir

    from pangu_light.passes.analysis.graph_stats import GraphStats

    return GraphStats.from_model(ir.load(graph)).total_parameters


class Scorer:
    """Perplexity and task accuracies of graphs, on the same windows and items for every graph."""

    def __init__(self, original: Path, args: argparse.Namespace):
        from pangu_light.calib.tasks import load_task, parse_tasks
        from pangu_light.calib.text import graph_tokenizer, sequences_for
        from pangu_light.frontend.task_scoring import model_encoder, open_model
        from pangu_light.passes.infra.graph_io import load_model_metadata

        self.args = args
        self.chosen = parse_tasks(args.tasks) if args.tasks else {}
        self.items = {task: load_task(task, args.limit) for task in self.chosen}
        encode, bos = graph_tokenizer(original, load_model_metadata(original), None)
        self.windows = sequences_for(args.eval_data, encode, bos, samples=args.eval_samples, seq_len=args.seq_len,
                                     seed=0, split="eval")
        self.encode = model_encoder(open_model(str(original), threads=args.threads))
        self.total = parameters(original)

    def describe(self) -> str:
        tasks = f"first {self.args.limit or 'all'} items of {', '.join(self.items)}" if self.items else "none"
        return (f"perplexity on {len(self.windows)} x {self.args.seq_len} tokens of {self.args.eval_data} "
                f"(eval split); tasks: {tasks} (zero-shot, accuracy ± stderr in %)")

    def score(self, graph: Path, label: str) -> dict:
        from pangu_light.calib.evaluate import perplexity
        from pangu_light.calib.scoring import score_items
        from pangu_light.calib.task_report import model_report
        from pangu_light.frontend.task_scoring import open_model

        note(f"{label}: perplexity and tasks of {graph.name}")
        count = parameters(graph)
        ppl = perplexity(graph, self.windows, batch_size=4, threads=self.args.threads)
        row = {"graph": graph.name, "parameters": count, "parameter_fraction": count / self.total,
               "perplexity": ppl.to_json()}
        if self.items:
            opened = open_model(str(graph), threads=self.args.threads)
            results = score_items(self.items, opened.logits, self.encode, metrics=self.chosen,
                                  max_length=opened.max_length, batch_size=self.args.batch_size,
                                  progress=not self.args.quiet, label=label)
            row["lm_eval"] = model_report(results, self.items, {"model": graph.name, "backend": "onnxruntime",
                                                                "limit": self.args.limit})
        with open(self.args.workdir / "scored-rows.jsonl", "a", encoding="utf-8") as log:  # survives a crash
            log.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "label": label, **row}) + "\n")
        return row


def recovering(args: argparse.Namespace) -> bool:
    return bool(args.recover_steps) or args.recover_minutes > 0


def recover(graph: Path, teacher: str, args: argparse.Namespace, out: Path) -> Path:
    """``pangu-light recover`` (or ``distill``, ``--recover-with``) of ``graph`` for ``--recover-steps``
    optimizer steps (the same work for every row, whatever the machine's load) or else
    ``--recover-minutes``; the distilled graph. Every row shares the teacher cache."""
    budget = (["--steps", str(args.recover_steps)] if args.recover_steps
              else ["--time-budget", f"{max(1, round(args.recover_minutes * 60))}s"])
    command = [cli(), args.recover_with, str(graph), "--teacher", teacher, "-o", str(out), *budget,
               "--data", "wiki", "--seq-len", str(args.seq_len),
               "--train-samples", str(args.train_samples), "--eval-samples", str(args.recover_eval_samples),
               "--teacher-cache", str(out.parent / f"teacher-cache-{args.recover_with}-{slug(Path(teacher).name)}"),
               "--eval-every", "1000", "--save-every", "100000", "--quiet",
               *(["--threads", str(args.threads)] if args.threads else []), *shlex.split(args.recover_args or "")]
    note(" ".join(shlex.quote(part) for part in command))
    from pangu_light.tools.cli import main as pangu_light  # in this process: no second torch import

    if pangu_light(command[1:]) != 0:
        raise SystemExit(f"pangu-light {args.recover_with} of {graph} failed")
    return out / "distilled.onnx"


def recovery_note(args: argparse.Namespace) -> str:
    budget = (f"{args.recover_steps} optimizer steps of 4 windows" if args.recover_steps
              else f"{args.recover_minutes:g} min of wall clock")
    extra = f" {args.recover_args}" if args.recover_args else ""
    return (f"`pangu-light {args.recover_with}{extra}` for {budget} per row (after set-up), {args.train_samples} "
            f"wiki windows of {args.seq_len} tokens, the unpruned model as teacher")


def latency(graphs: list[Path], args: argparse.Namespace) -> dict:
    """benchmarks/ort_latency.py on ``graphs`` (the first is the reference): alternating runs, medians."""
    command = [sys.executable, str(HERE / "ort_latency.py"), *map(str, graphs), "--seq", str(args.latency_seq),
               "--repeats", str(args.repeats), "--threads", str(args.threads or 2), "--json"]
    note(f"latency of {len(graphs)} graphs, seq {args.latency_seq}, {args.repeats} alternating repeats")
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def header(title: str, report: dict, args: argparse.Namespace) -> list[str]:
    from pangu_light.reports.machine import format_machine
    from pangu_light.runtime.machine import describe_machine

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    version_text = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    return [f"## {title}", "", f"- command: `{report['command']}`",
            f"- machine: {format_machine(describe_machine())}; load average at the start "
            f"{report['load_start']}, at the end {load}", f"- versions: {version_text}",
            f"- time: {report['seconds']:.0f} s"]


def row_table(rows: dict[str, dict]) -> list[str]:
    """| row | parameters | held-out perplexity | task metrics... | for scored rows."""
    from pangu_light.calib.scoring import format_perplexity, markdown_table

    if all("lm_eval" in r for r in rows.values()):
        tasks = markdown_table({name: r["lm_eval"]["results"] for name, r in rows.items()}).splitlines()
    else:
        tasks = ["| model |", "|---|"] + [f"| {name} |" for name in rows]
    lines = ["| row | parameters | held-out perplexity" + tasks[0].removeprefix("| model"), tasks[1] + "---|---|"]
    for line, (name, r) in zip(tasks[2:], rows.items(), strict=True):
        share, ppl = 100 * r["parameter_fraction"], r["perplexity"]["perplexity"]
        lines.append(f"| {name} | {r['parameters']:,} ({share:.1f}%) | {format_perplexity(ppl)} |"
                     + line.removeprefix(f"| {name} |"))
    return lines


def chosen_rows(text: str | None, rows, option: str) -> list[str]:
    """The rows named in ``text`` (comma-separated; None: all), in the table's order."""
    if not text:
        return list(rows)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in rows]
    if unknown:
        raise SystemExit(f"{option}: unknown rows {unknown}; choose from {', '.join(rows)}")
    return [row for row in rows if row in names]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def finish(name: str, report: dict, markdown: str, args: argparse.Namespace) -> None:
    from pangu_light.core.files import write_json, write_text

    write_json(args.output / f"{name}.json", report)
    write_text(args.output / f"{name}.md", markdown)
    print(markdown)


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    from pangu_light.core.files import atomic_write

    try:
        with atomic_write(path, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)
