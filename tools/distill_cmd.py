"""Recover a pruned graph by knowledge distillation from the unpruned model, and export it back.

    pangu-light distill pruned.onnx --teacher smollm2-135m --data wiki -o distilled/
    torchrun --nproc_per_node 2 -m pangu_light.tools.cli distill pruned.onnx --teacher smollm2-135m -o d/

The pruned graph is re-imported into PyTorch with its per-layer shapes and trained to match the
teacher's full-vocabulary distribution: loss = (1 - a) T^2 KL(teacher || student) + a CE
(--temperature T, --ce-weight a; KL alone by default), AdamW with a cosine decay of the learning
rate, gradient clipping and accumulation, bfloat16 autocast matmuls where they are fast (a GPU, or
a CPU with bfloat16 instructions; --bf16 / --no-bf16 force the choice).
The teacher's final hidden states are computed once and cached on disk (its logits are one
matmul away), unless --online-teacher. Training text is the calibration split of --data, cut
into --seq-len windows and shuffled by --seed; held-out perplexity and KL are measured on the
evaluation split of --eval-data (default: the same source) every --eval-every steps.

--time-budget 30m stops training at a wall-clock budget (counted after the set-up, reported apart
in summary.json with the steps taken and why the run stopped); --kd topk --top-k 64 distils from
the teacher's top-k tokens plus one tail bucket instead of the full vocabulary (see
pangu_light.frontend.kd_topk for the error bound; held-out KL is always the full one);
--freeze-embeddings keeps the embedding and lm_head fixed (when the hidden size was not pruned).

OUTDIR receives: checkpoints/step-N.pt (every --save-every steps; --resume continues the same
curve exactly), metrics.jsonl (with tokens and elapsed_s), loss.png (loss and held-out perplexity against tokens,
or seconds with --plot-axis seconds),
model/ (a standard Hugging Face directory when every layer has one shape, else per-layer shapes
that pangu_light.frontend.student.load_student reads), distilled.onnx (re-exported with the
same clean exporter and checked against PyTorch under ONNX Runtime), and summary.json.

Under torchrun the global batch is --batch-size x --grad-accum x processes, data is sharded by
rank, gradients are averaged with DistributedDataParallel (gloo on CPU, nccl on GPU; --fsdp
shards the student with FSDP2 instead), and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pangu_light.tools.distill_options import add_distill_arguments, config_from_args, report

__all__ = ["HELP", "add_arguments", "run"]

HELP = "recover a pruned graph by distillation from the unpruned model (full-vocabulary or top-k KL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", type=Path, help="the pruned .onnx graph (from `pangu-light compile`)")
    add_distill_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pangu_light.frontend.distill import distill
    from pangu_light.frontend.distill.budget import parse_duration

    budget = None if args.time_budget is None else parse_duration(args.time_budget)
    config, global_batch = config_from_args(args, args.graph, args.output, time_budget=budget)
    result = distill(config)
    if int(os.environ.get("RANK", "0")) == 0:
        report(result, args, global_batch)
    return 0
