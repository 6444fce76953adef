"""Distillation speed and quality on SmolLM2-135M (numbers for reports, never a timed test).

    python benchmarks/distill.py speed PRUNED.onnx [--teacher smollm2-135m] [--batch 4] [--seq 256]
        [--repeats 8] [--warmup 2] [--no-bf16] [--naive] [--topk K] [--data wiki]
    python benchmarks/distill.py quality --workdir DIR [--tokens 100000] [--eval-samples 16]

``speed`` times, alternately in one process on the same batch (medians over the repeats):

- the whole KD step as ``pangu-light distill`` runs it: teacher hidden states read from a cache
  file, student forward, fused chunked KL over the full vocabulary with both heads, backward,
  gradient clipping, AdamW;
- the same without the optimizer (forward + backward of the KD loss);
- the student's own forward + backward alone: the Hugging Face forward to logits with its
  next-token cross-entropy, backward (what training the student without a teacher costs);
- with ``--naive``: the KD loss written plainly (both [B, L, V] logits materialised, autograd);
- with ``--topk K``: the KD step with the top-k loss (``--kd topk``) from a top-k cache, and, on
  the same windows, how far its KL is from the full one: mean KL, mean KL_k, their relative
  difference, and the mean of the bound P range(z_t - z_s) / T (``frontend.kd_topk``).

``--data`` takes the windows from that source's evaluation split (held-out text) instead of
random token ids.

``quality`` expects DIR/orig.onnx, DIR/slnp.onnx and DIR/noslnp.onnx made with the CLI::

    pangu-light export smollm2-135m -o DIR/orig.onnx
    pangu-light calibrate DIR/orig.onnx -o DIR/stats.npz
    pangu-light plan DIR/stats.npz --hidden 448 --heads-per-group 2 --ffn 1152 --uniform -o DIR/plan.json
    pangu-light compile DIR/orig.onnx --plan DIR/plan.json -o DIR/slnp.onnx
    pangu-light compile DIR/orig.onnx --plan DIR/plan.json --no-slnp -o DIR/noslnp.onnx

distills both with ``pangu-light distill`` (same data, seed and cached teacher), then measures the
perplexity of the teacher, both pruned graphs and both distilled graphs under ONNX Runtime on the
same held-out windows (LAMBADA's and Wikipedia's evaluation splits), and prints the held-out
Wikipedia perplexity the runs logged along the way (bf16 matmuls, so slightly off ORT's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pangu_light.reports.table import format_table


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------- speed


def speed(args: argparse.Namespace) -> None:
    from pangu_light.frontend.distill import DistillObjective, next_token_targets
    from pangu_light.frontend.kd_loss import KDLossOptions
    from pangu_light.frontend.loading import load_hf_model, resolve_model
    from pangu_light.frontend.reimport import reimport
    from pangu_light.frontend.teacher_cache import TeacherCache, teacher_identity

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher_dir = resolve_model(args.teacher)
    student = reimport(args.graph, attn_implementation="sdpa").model.train()
    teacher = load_hf_model(teacher_dir)
    vocab = student.lm_head.weight.shape[0]
    if args.data:
        from pangu_light.calib.text import graph_tokenizer, sequences_for
        from pangu_light.passes.infra.graph_io import load_model_metadata

        encode, eos_id = graph_tokenizer(args.graph, load_model_metadata(args.graph), teacher_dir)
        ids = torch.from_numpy(np.ascontiguousarray(sequences_for(
            args.data, encode, eos_id, samples=args.batch, seq_len=args.seq, seed=0, split="eval"), dtype=np.int64))
    else:
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    targets = next_token_targets(ids)
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherCache.open_or_build(tmp, teacher=teacher, identity=teacher_identity(teacher_dir),
                                           windows=ids.numpy(), batch_size=args.batch, quiet=True)
        teacher_head = teacher.lm_head.weight.detach()
        options = KDLossOptions(chunk=args.chunk, matmul_dtype=torch.bfloat16 if args.bf16 else torch.float32)
        objective = DistillObjective(student, args.bf16, "cpu")
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-6, betas=(0.9, 0.95), fused=True)  # as distill
        rows = np.arange(args.batch)

        def kd_step(update: bool) -> float:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _, _ = objective(ids, cache[rows], teacher_head, targets, options)
            loss.backward()
            if update:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
                optimizer.step()
            return time.perf_counter() - start

        if args.topk:
            from pangu_light.frontend.teacher_cache import TopKCache

            topk_cache = TopKCache.open_or_build(tmp, teacher=teacher, identity=teacher_identity(teacher_dir),
                                                 windows=ids.numpy(), k=args.topk, temperature=1.0,
                                                 batch_size=args.batch, quiet=True)
            top = topk_cache[rows]
            topk_tensors = (top.log_p, top.index, top.tail)

        def topk_step() -> float:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _, _ = objective(ids, None, teacher_head, targets, options, topk_tensors)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
            optimizer.step()
            return time.perf_counter() - start

        def student_alone() -> float:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = student(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            return time.perf_counter() - start

        def naive_kd() -> float:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                z_s = student(input_ids=ids, use_cache=False).logits.float()
                z_t = (cache[rows] @ teacher_head.T.to(z_s.dtype)).float() if not args.bf16 else \
                    torch.matmul(cache[rows].to(torch.bfloat16), teacher_head.T.to(torch.bfloat16)).float()
            log_p = torch.log_softmax(z_t, -1)
            loss = (log_p.exp() * (log_p - torch.log_softmax(z_s, -1))).sum(-1).mean()
            loss.backward()
            return time.perf_counter() - start

        tasks = {
            "kd_step": lambda: kd_step(True),
            "kd_fwd_bwd": lambda: kd_step(False),
            "student_fwd_bwd": student_alone,
        }
        if args.naive:
            tasks["naive_kd_fwd_bwd"] = naive_kd
        if args.topk:
            tasks[f"top{args.topk}_kd_step"] = topk_step
            error = _topk_error(student, ids, cache[rows], teacher_head, top)
        times: dict[str, list[float]] = {name: [] for name in tasks}
        load_start = os.getloadavg()
        for round_index in range(args.warmup + args.repeats):
            for name, task in tasks.items():
                seconds = task()
                if round_index >= args.warmup:
                    times[name].append(seconds)
            print(
                f"round {round_index + 1}: " + ", ".join(f"{n} {t[-1] if t else 0:.2f}s" for n, t in times.items()),
                file=sys.stderr,
                flush=True,
            )
    tokens = args.batch * args.seq
    params = sum(p.numel() for p in student.parameters())
    result = {
        "graph": str(args.graph),
        "student_parameters": params,
        "batch": args.batch,
        "seq": args.seq,
        "bf16": args.bf16,
        "chunk": args.chunk,
        "threads": torch.get_num_threads(),
        "cpu": _cpu(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "median_seconds": {n: statistics.median(t) for n, t in times.items()},
        "samples": times,
    }
    result["tokens_per_second"] = {n: tokens / s for n, s in result["median_seconds"].items()}
    result["kd_step_over_student_fwd_bwd"] = (
        result["median_seconds"]["kd_step"] / result["median_seconds"]["student_fwd_bwd"]
    )
    result["kd_fwd_bwd_over_student_fwd_bwd"] = (
        result["median_seconds"]["kd_fwd_bwd"] / result["median_seconds"]["student_fwd_bwd"]
    )
    if args.topk:
        result["topk"] = {"k": args.topk, "windows": "eval split of " + args.data if args.data else "random ids",
                          **error}
        result["topk_kd_step_over_kd_step"] = (
            result["median_seconds"][f"top{args.topk}_kd_step"] / result["median_seconds"]["kd_step"]
        )
    print(json.dumps(result, indent=2) if args.json else _speed_table(result))


@torch.no_grad()
def _topk_error(student, ids, teacher_hidden, teacher_head, top) -> dict[str, float]:
    """Full KL, top-k KL and the bound, per position, averaged (float32, T = 1, the initial student)."""
    from pangu_light.frontend.kd_topk import TopKTeacher, topk_error_bound

    z_s = student(input_ids=ids, use_cache=False).logits.float().reshape(-1, teacher_head.shape[0])
    z_t = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) @ teacher_head.T).float()
    k = top.log_p.shape[-1]
    flat = TopKTeacher(top.log_p.reshape(-1, k), top.index.reshape(-1, k), top.tail.reshape(-1))
    log_p, log_q = torch.log_softmax(z_t, -1), torch.log_softmax(z_s, -1)
    full = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl_k, _ = flat.kl_and_target(slice(None), log_q)
    full_mean, topk_mean = float(full.mean()), float(kl_k) / len(full)
    return {"kl_full": full_mean, "kl_topk": topk_mean, "relative_error": (full_mean - topk_mean) / full_mean,
            "bound_mean": float(topk_error_bound(z_s, z_t, flat).mean()), "tail_mass_mean": float(flat.tail.mean())}


def _speed_table(r: dict) -> str:
    lines = [
        f"student {r['student_parameters'] / 1e6:.1f}M parameters, batch {r['batch']} x {r['seq']}, "
        f"{'bf16 autocast' if r['bf16'] else 'fp32'}, {r['threads']} threads, {r['cpu']}",
        f"load average {r['load_average_start'][0]:.1f} -> {r['load_average_end'][0]:.1f}",
        f"medians over {len(r['samples']['kd_step'])} rounds:",
    ]
    table = [("", "median s", "tokens/s")]
    for name, seconds in r["median_seconds"].items():
        table.append((name, f"{seconds:.3f}", f"{r['tokens_per_second'][name]:.0f}"))
    lines.append(format_table(table))
    lines.append(
        f"KD step / student fwd+bwd: {r['kd_step_over_student_fwd_bwd']:.2f}x "
        f"(KD fwd+bwd alone {r['kd_fwd_bwd_over_student_fwd_bwd']:.2f}x)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- quality


def quality(args: argparse.Namespace) -> None:
    from pangu_light.calib.evaluate import perplexity
    from pangu_light.calib.text import graph_tokenizer, sequences_for
    from pangu_light.passes.infra.graph_io import load_model_metadata

    work = Path(args.workdir)
    graphs = {name: work / f"{name}.onnx" for name in ("orig", "slnp", "noslnp")}
    missing = [str(p) for p in graphs.values() if not p.is_file()]
    if missing:
        sys.exit(f"missing {missing}: make them with the CLI (see this script's docstring)")
    runs = {}
    for name in ("slnp", "noslnp"):
        out = work / f"distill-{name}-{args.tokens}"
        if not (out / "summary.json").is_file():
            command = [
                sys.executable,
                "-m",
                "pangu_light.tools.cli",
                "distill",
                str(graphs[name]),
                "--teacher",
                args.teacher,
                "-o",
                str(out),
                "--data",
                "wiki",
                "--tokens",
                str(args.tokens),
                "--seed",
                str(args.seed),
                "--teacher-cache",
                str(work / "teacher_cache"),
                "--eval-every",
                str(args.eval_every),
                "--save-every",
                str(args.save_every),
                *(["--threads", str(args.threads)] if args.threads else []),
                *(["--resume"] if (out / "checkpoints").is_dir() else []),
            ]
            print(" ".join(command), file=sys.stderr, flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        runs[name] = out
    encode, eos = graph_tokenizer(graphs["orig"], load_model_metadata(graphs["orig"]), None)
    # The held-out text: LAMBADA's evaluation split, and the Wikipedia windows the runs evaluated on.
    eval_sets = {
        args.eval_data: sequences_for(
            args.eval_data, encode, eos, samples=args.eval_samples, seq_len=256, seed=0, split="eval"
        ),
        "wiki": sequences_for("wiki", encode, eos, samples=16, seq_len=256, seed=args.seed, split="eval"),
    }
    ppl: dict[str, dict[str, float]] = {name: {} for name in eval_sets}
    to_eval = {
        "teacher": graphs["orig"],
        "pruned (SLNP)": graphs["slnp"],
        "pruned (no SLNP)": graphs["noslnp"],
        "distilled (SLNP)": runs["slnp"] / "distilled.onnx",
        "distilled (no SLNP)": runs["noslnp"] / "distilled.onnx",
    }
    for label, path in to_eval.items():
        for name, windows in eval_sets.items():
            ppl[name][label] = perplexity(path, windows, batch_size=4).perplexity
            print(f"{label} on {name}: {ppl[name][label]:.2f}", file=sys.stderr, flush=True)
    curves = {}
    for name, out in runs.items():
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(h["tokens"], round(h["eval_perplexity"], 3)) for h in history if "eval_perplexity" in h]
        speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
        curves[name + "_median_tokens_per_s"] = statistics.median(speeds)
    result = {
        "tokens": args.tokens,
        "eval": {
            args.eval_data: f"eval split, {args.eval_samples} x 256 tokens",
            "wiki": "eval split, 16 x 256 tokens (the runs' held-out set)",
        },
        "perplexity": ppl,
        "wiki_heldout_curves": curves,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, values in ppl.items():
        print(f"perplexity on {name} ({result['eval'][name]}; ONNX Runtime, float32):")
        table = [
            (f"  {label}", f"{value:.2f}", f"({value / values['teacher']:.2f}x teacher)")
            for label, value in values.items()
        ]
        print(format_table(table))
    for name in ("slnp", "noslnp"):
        print(
            f"held-out wiki perplexity during distillation ({name}; tokens: ppl): "
            + ", ".join(f"{t}: {p}" for t, p in curves[name])
        )
        print(f"  median {curves[name + '_median_tokens_per_s']:.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("graph", type=Path)
    s.add_argument("--teacher", default="smollm2-135m")
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--repeats", type=int, default=8)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--chunk", type=int, default=256)
    s.add_argument("--threads", type=int)
    s.add_argument("--no-bf16", dest="bf16", action="store_false")
    s.add_argument("--naive", action="store_true", help="also time the plain (unfused) KD loss")
    s.add_argument("--topk", type=int, help="also time top-k KD with this k, and measure its KL error")
    s.add_argument("--data", help="windows from this source's evaluation split (default: random ids)")
    s.add_argument("--json", action="store_true")
    q = sub.add_parser("quality")
    q.add_argument("--workdir", required=True)
    q.add_argument("--teacher", default="smollm2-135m")
    q.add_argument("--tokens", type=int, default=100_000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval-data", default="lambada")
    q.add_argument("--eval-samples", type=int, default=16)
    q.add_argument("--eval-every", type=int, default=25)
    q.add_argument("--save-every", type=int, default=50)
    q.add_argument("--threads", type=int, help="torch threads of each distillation run")
    q.add_argument("--json", action="store_true")
    args = parser.parse_args()
    speed(args) if args.what == "speed" else quality(args)


if __name__ == "__main__":
    main()
