"""Zero-shot task accuracy of the unpruned SmolLM2-135M (the embedded default), lm-eval-harness style.

    python benchmarks/task_accuracy.py [--limit 200] [--tasks hellaswag,piqa,...] [--workdir /tmp/task-accuracy]
        [--graph orig.onnx] [--torch] [--batch-size 8] [--threads N] [--json results.json]

1. ``pangu-light export smollm2-135m -o WORKDIR/orig.onnx`` (the no-cache graph), or ``--graph``.
2. Every task of ``calib.tasks`` on the first ``--limit`` items of its split, scored under ONNX
   Runtime (``calib.scoring``); with ``--torch`` also through the PyTorch model the graph was
   exported from (``frontend.task_scoring``), on the same items.
3. Prints a Markdown report: the command, machine, versions, time, and one table row per model
   (accuracy ± standard error in %, LAMBADA perplexity). ``--json`` writes lm-eval's layout.

The weights are SmolLM2-135M-Instruct dequantised from a 4-bit GGUF (``frontend.loading``), so
published numbers of the bf16 base model are a reference, not a target.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from common import export_graph, note

from pangu_light.calib.scoring import markdown_table, ort_logits, score_tasks
from pangu_light.calib.tasks import TASKS
from pangu_light.core.files import write_json
from pangu_light.frontend.loading import load_tokenizer, resolve_model
from pangu_light.reports.machine import format_machine
from pangu_light.runtime.machine import describe_machine

ALIAS = "smollm2-135m"




def versions() -> str:
    import numpy
    import onnxruntime
    import torch
    import transformers

    return (f"python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, numpy {numpy.__version__}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="first N items of each task's split (default 200)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/task-accuracy"), help="where the graph goes")
    parser.add_argument("--graph", type=Path, help="score this exported graph instead of exporting one")
    parser.add_argument("--torch", action="store_true", help="also score the PyTorch model (same items)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward call (default 8)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    parser.add_argument("--json", type=Path, help="write the results (lm-eval layout) here")
    args = parser.parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]

    args.workdir.mkdir(parents=True, exist_ok=True)
    graph = args.graph or export_graph(ALIAS, args.workdir)
    model_dir = resolve_model(ALIAS)
    tokenizer = load_tokenizer(model_dir)

    def encode(text: str) -> list[int]:  # lm-eval's default for causal models: no BOS / special tokens
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    started = time.perf_counter()
    results = {f"{ALIAS} (ORT, {graph.name})": score_tasks(
        tasks, ort_logits(graph, threads=args.threads), encode, limit=args.limit, batch_size=args.batch_size,
        label="ort")}
    if args.torch:
        from pangu_light.frontend.loading import load_hf_model
        from pangu_light.frontend.task_scoring import score_model_tasks

        results[f"{ALIAS} (PyTorch)"] = score_model_tasks(
            load_hf_model(model_dir), encode, tasks, limit=args.limit, batch_size=args.batch_size, label="torch")
    elapsed = time.perf_counter() - started

    command = " ".join(shlex.quote(part) for part in [sys.executable, *sys.argv])
    print(f"## Zero-shot accuracy of {ALIAS}, unpruned (first {args.limit} items of each task)\n")
    print(f"- command: `{command}`")
    print(f"- machine: {format_machine(describe_machine())}")
    print(f"- versions: {versions()}")
    print(f"- time: {elapsed:.0f} s; weights: SmolLM2-135M-Instruct dequantised from a 4-bit GGUF\n")
    print(markdown_table(results))
    if args.json:
        write_json(args.json, {"results": results, "config": {"limit": args.limit, "command": command}})
        note(f"wrote {args.json}")


if __name__ == "__main__":
    main()
