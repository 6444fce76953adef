"""The options of a distillation run and the ``DistillConfig`` they describe, shared by ``distill``
and ``recover`` (which adds a local-reconstruction stage before it); not a command itself.

- ``add_distill_arguments``: --teacher, -o, the data, training, teacher-cache and run options.
- ``config_from_args``: the config (the windows tokenised, the step count or cap from --tokens,
  --steps or, under a time budget, one pass over the training windows).
- ``report``: the lines a finished run prints.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from pangu_light.calib.text import graph_tokenizer, sequences_for
from pangu_light.core.errors import PanguLightError

__all__ = ["add_distill_arguments", "config_from_args", "report"]


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """Every distill option but the input graph."""
    parser.add_argument("--teacher", required=True, help="the unpruned model: alias, local HF directory or hub id")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default="wiki",
        help="training text: wiki (default), lambada, or a .txt/.jsonl file (calibration split)",
    )
    data.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    data.add_argument(
        "--train-samples", type=int, help="use only this many training windows (default: all of the split)"
    )
    data.add_argument("--eval-data", help="held-out text (evaluation split; default: the same source as --data); "
                      "several sources separated by commas (lambada,wiki) are each reported apart")
    data.add_argument("--eval-samples", type=int, default=16, help="held-out windows per source (default 16)")
    data.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    data.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: recorded in the graph)")
    train = parser.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--tokens", type=int, help="training tokens (default 100000; rounded up to whole steps)")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --tokens)")
    train.add_argument(
        "--time-budget", metavar="DURATION",
        help="stop training after this wall-clock time (90s, 30m, 1.5h), counted from the end of the set-up; "
        "--steps/--tokens are then a cap (default: one pass over the training windows, whose teacher cache "
        "the set-up builds: bound it with --tokens or --train-samples) and the learning-rate cosine follows the clock",
    )
    train.add_argument("--batch-size", type=int, default=4, help="windows per micro-batch and process (default 4)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this (default 0.1)")
    train.add_argument(
        "--warmup", metavar="STEPS|FRACTION", default="0.1",
        help="linear warm-up of the learning rate from lr/W: whole steps (20; 0 for none) or a fraction of the run "
        "(default 0.1: the first 10%% of the steps, or of --time-budget, and at least 4 steps); the cosine decay "
        "follows it",
    )
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default 0)")
    train.add_argument(
        "--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"), help="AdamW betas (default 0.9 0.95)"
    )
    train.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (default 1.0)")
    train.add_argument("--temperature", type=float, default=1.0, help="KL temperature T (default 1)")
    train.add_argument(
        "--ce-weight", type=float, default=0.0, help="weight a of the next-token cross-entropy (default 0: KL only)"
    )
    train.add_argument(
        "--bf16", dest="bf16", action="store_true", default=None,
        help="bfloat16 autocast matmuls (default on a GPU, and on a CPU with bfloat16 instructions, AVX512-BF16 or "
        "AMX: other CPUs emulate them, tens of times slower than float32)",
    )
    train.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 matmuls")
    train.add_argument(
        "--kd", choices=("full", "topk"), default="full",
        help="full: KL over the whole vocabulary (default, exact); topk: KL over the teacher's --top-k tokens plus "
        "one tail bucket, from a cache of the teacher's top-k log-probabilities (held-out KL stays full)",
    )
    train.add_argument(
        "--top-k", type=int, default=64, help="teacher tokens kept per position with --kd topk (default 64)"
    )
    train.add_argument("--chunk", type=int, default=256, help="token rows per chunk of the fused loss (default 256)")
    train.add_argument("--attn", choices=("eager", "sdpa"), help="student attention (default sdpa; eager for Gemma2)")
    train.add_argument("--threads", type=int, help="torch intra-op threads")
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument(
        "--online-teacher", action="store_true", help="run the teacher every step instead of caching it"
    )
    teacher.add_argument(
        "--teacher-cache",
        type=Path,
        help="cache directory (default OUTDIR/teacher_cache); runs on the same data share it",
    )
    teacher.add_argument(
        "--teacher-cache-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="cache precision (default float32, exact; float16 halves the disk)",
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps (default 25)")
    run_group.add_argument(
        "--eval-interval", metavar="DURATION",
        help="also evaluate once this much training time (90s, 2m) has passed since the last evaluation: "
        "points spread evenly along a time axis whatever the step speed (evaluations count in the time budget)",
    )
    run_group.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    run_group.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    run_group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in OUTDIR (or the one given)",
    )
    run_group.add_argument(
        "--fsdp", action="store_true", help="under torchrun: shard the student (FSDP2) instead of DDP"
    )
    run_group.add_argument(
        "--plot-axis", choices=("tokens", "seconds"), default="tokens",
        help="x axis of loss.png: tokens seen (default) or elapsed training seconds",
    )
    run_group.add_argument("--no-export", dest="export", action="store_false", help="skip the ONNX re-export")
    train.add_argument(
        "--freeze-embeddings", action="store_true",
        help="keep the embedding and lm_head fixed (only when the hidden size was not pruned)",
    )
    run_group.add_argument("--quiet", action="store_true", help="no progress output")


def config_from_args(args: argparse.Namespace, graph: Path, output: Path, *, time_budget: float | None):
    """The ``DistillConfig`` the options describe for ``graph`` -> ``output`` (training limited to
    ``time_budget`` seconds), and the global batch."""
    import numpy as np
    import torch

    if args.bf16 is None:  # resolved here, in place: recover reads args.bf16 too
        args.bf16 = resolve_bf16(quiet=getattr(args, "quiet", False))

    from pangu_light.frontend.distill import DistillConfig
    from pangu_light.frontend.distill.budget import parse_duration
    from pangu_light.frontend.distill.schedule import parse_warmup
    from pangu_light.frontend.loading import resolve_model
    from pangu_light.passes.infra.graph_io import load_model_metadata
    from pangu_light.runtime.tokenizer import find_tokenizer_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    if output.resolve() == graph.resolve() or output.resolve() in graph.resolve().parents:
        raise PanguLightError(f"output {output} would hold the input graph; choose another -o")
    metadata = load_model_metadata(graph)
    teacher_dir = resolve_model(args.teacher)
    tokenizer_dir = find_tokenizer_dir(graph, metadata, args.tokenizer)
    encode, eos_id = graph_tokenizer(graph, metadata, args.tokenizer)
    train = sequences_for(
        args.data, encode, eos_id, samples=args.train_samples, seq_len=args.seq_len, seed=args.seed, split="calib"
    )
    names = [name.strip() for name in (args.eval_data or args.data).split(",") if name.strip()]
    if not names:
        raise PanguLightError("--eval-data names no source: pass wiki, lambada, a file, or several with commas")
    parts = [sequences_for(name, encode, eos_id, samples=args.eval_samples, seq_len=args.seq_len, seed=args.seed,
                           split="eval") for name in names]
    evaluation = np.concatenate(parts)
    sources = tuple((Path(name).stem, len(part)) for name, part in zip(names, parts)) if len(names) > 1 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = args.batch_size * args.grad_accum * world
    budget = time_budget
    if args.steps is not None:
        steps = args.steps
    elif budget is not None and args.tokens is None:  # the cap: one pass over the training windows
        steps = math.ceil(len(train) / global_batch)
    else:
        tokens = 100_000 if args.tokens is None else args.tokens
        if tokens < 1:
            raise PanguLightError(f"--tokens must be at least 1 (got {tokens})")
        steps = math.ceil(tokens / (global_batch * args.seq_len))
    warmup = parse_warmup(args.warmup)
    resume = args.resume if args.resume is True or args.resume is False else Path(args.resume)
    config = DistillConfig(
        graph=graph,
        teacher_dir=teacher_dir,
        output=output,
        train_windows=train,
        eval_windows=evaluation,
        eval_sources=sources,
        tokenizer_dir=tokenizer_dir,
        steps=steps,
        micro_batch=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=warmup[0],
        warmup_fraction=warmup[1],
        weight_decay=args.weight_decay,
        betas=tuple(args.betas),
        clip=args.clip,
        temperature=args.temperature,
        ce_weight=args.ce_weight,
        bf16=args.bf16,
        chunk=args.chunk,
        seed=args.seed,
        online_teacher=args.online_teacher,
        teacher_cache_dir=args.teacher_cache,
        teacher_cache_dtype=args.teacher_cache_dtype,
        eval_every=args.eval_every,
        eval_interval=None if args.eval_interval is None else parse_duration(args.eval_interval),
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=resume,
        fsdp=args.fsdp,
        attn_implementation=args.attn,
        export=args.export,
        quiet=args.quiet,
        time_budget=budget,
        kd=args.kd,
        top_k=args.top_k,
        plot_axis=args.plot_axis,
        freeze_embeddings=args.freeze_embeddings,
    )
    return config, global_batch
def report(result, args: argparse.Namespace, global_batch: int) -> None:
    """What a finished run prints (rank 0)."""
    evals = [h for h in result.history if "eval_perplexity" in h]
    first, last = evals[0], evals[-1]
    trained = [h for h in result.history if "tokens_per_s" in h]
    speed = sorted(h["tokens_per_s"] for h in trained)
    stop = " (stopped on the time budget)" if result.stopped == "time_budget" else ""
    print(
        f"distilled {result.steps} steps{stop} ({last['tokens']:,} tokens, "
        f"global batch {global_batch} x {args.seq_len}); "
        f"held-out perplexity {first['eval_perplexity']:.3f} -> {last['eval_perplexity']:.3f}, "
        f"KL to the teacher {first['eval_kl']:.4f} -> {last['eval_kl']:.4f}"
        + (f"; median {speed[len(speed) // 2]:.0f} tokens/s" if speed else "")
    )
    if result.model_dir is not None:
        kind = "Hugging Face directory" if result.model_format == "hf" else "per-layer student (load_student)"
        print(
            f"wrote {result.model_dir} ({kind})"
            + (f", {result.graph} (ORT vs PyTorch max |diff| {result.export_max_abs_diff:.2e})" if result.graph else "")
        )
    print(f"curves: {result.output / 'loss.png'}, {result.output / 'metrics.jsonl'}")


def resolve_bf16(*, quiet: bool = False) -> bool:
    """The default for bfloat16 autocast: on with a GPU; on a CPU only where it has bfloat16
    instructions (``cpu_has_native_bf16``), else float32 with one line saying why."""
    import sys

    import torch

    from pangu_light.frontend.distill import objective

    if torch.cuda.is_available() or objective.cpu_has_native_bf16():
        return True
    if not quiet:
        print("this CPU has no bfloat16 instructions (emulated bfloat16 matmuls measured tens of times slower): "
              "training in float32 (--bf16 forces bfloat16)", file=sys.stderr)
    return False
