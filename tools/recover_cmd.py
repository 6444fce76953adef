"""Recover a pruned model within one wall-clock budget: local reconstruction, then distillation.

    pangu-light recover out/prune --teacher smollm2-135m --time-budget 30m --local-fraction 0.3 -o out/recover

PRUNED is a `pangu-light prune` directory (its pruned.onnx is used) or a pruned .onnx graph.

Stage 1, local reconstruction (pangu_light.frontend.distill.local): the teacher's residual stream
is captured at every layer boundary on --local-samples training windows, mapped to the student's
hidden channels, and each pruned layer is trained alone to reproduce the teacher's output across
the layers it stands for (a dropped layer's work goes to the kept layer before it), with
--local-loss mse or cosine at --local-lr; no lm_head in the loop. Each layer's error is measured
before and after on 4 training windows the stage does not train on; a layer that did not improve
is put back. It gets --local-fraction of
the budget (its evaluations included), shared among the layers.

Stage 2, knowledge distillation: `pangu-light distill` from the reconstructed weights with the
rest of the budget (every distill option applies: --kd topk, --freeze-embeddings, ...). It trains
the module the local stage left, with the teacher already loaded and its states on the evaluation
windows already computed (one re-import, one teacher load, one evaluation pass of the teacher).

Set-up (loading, re-import, the teacher cache, and the capture of the teacher's residual stream,
reported as capture_s) is not counted, as in distill; summary.json's "stages" times each part. OUTDIR receives what
distill writes (checkpoints/, model/, distilled.onnx, summary.json with a "recover" section:
both stages' seconds and every layer's held-out error before and after), local/layers.json, and
metrics.jsonl and loss.png over both stages: held-out perplexity against elapsed seconds and
tokens, the KD stage's entries shifted by the local stage's time and tokens (its windows' tokens),
each entry tagged with its "stage", so that curves of different recipes lie on one plot.
Not resumable: a second run needs a new -o.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write, write_json, write_text
from pangu_light.tools.distill_options import add_distill_arguments, config_from_args, report

__all__ = ["HELP", "add_arguments", "run"]

HELP = "recover a pruned model in one time budget: layer-wise local reconstruction, then distillation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pruned", type=Path, help="a `pangu-light prune` output directory, or a pruned .onnx graph")
    add_distill_arguments(parser)
    local = parser.add_argument_group("local reconstruction")
    local.add_argument("--local-fraction", type=float, default=0.3,
                       help="share of --time-budget for local reconstruction (default 0.3; 0 skips it)")
    local.add_argument("--local-samples", type=int, default=64,
                       help="training windows whose teacher states are captured (default 64)")
    local.add_argument("--local-lr", type=float, default=3e-4, help="AdamW learning rate per layer (default 3e-4)")
    local.add_argument("--local-loss", choices=("mse", "cosine"), default="mse",
                       help="mse (normalised by the layer's own update; default) or cosine on the residual stream")
    local.add_argument("--local-steps", type=int, default=200,
                       help="at most this many steps per layer (default 200; the budget may stop it first)")


def _graph(pruned: Path) -> Path:
    if pruned.is_dir():
        graph = pruned / "pruned.onnx"
        if not graph.is_file():
            raise PanguLightError(f"{pruned} holds no pruned.onnx: pass a `pangu-light prune` directory or a graph")
        return graph
    if not pruned.is_file():
        raise PanguLightError(f"{pruned}: no such file or directory")
    return pruned


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pangu_light.frontend.distill import budget as budget_clock
    from pangu_light.frontend.distill import distill, schedule_windows
    from pangu_light.frontend.distill.budget import parse_duration
    from pangu_light.frontend.distill.evaluation import eval_chunks
    from pangu_light.frontend.distill.local import LocalConfig, heldout_metrics, reconstruct
    from pangu_light.frontend.distill.objective import attention_for
    from pangu_light.frontend.distill.usage import Stages, stamp
    from pangu_light.frontend.loading import load_hf_model
    from pangu_light.frontend.reimport import reimport
    from pangu_light.frontend.teacher_cache import teacher_hidden
    from pangu_light.reports.loss_plot import plot_history

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PanguLightError("recover runs in one process; use `torchrun ... distill` for several")
    if not 0.0 <= args.local_fraction < 1.0:
        raise PanguLightError(f"--local-fraction {args.local_fraction} must be in [0, 1): KD needs a share")
    if args.local_samples < 1 or args.local_steps < 1:
        raise PanguLightError("--local-samples and --local-steps must be at least 1")
    if args.local_fraction > 0 and args.train_samples is not None and args.train_samples < 2:
        raise PanguLightError("local reconstruction needs at least 2 training windows (--train-samples)")
    if args.resume:
        raise PanguLightError("recover is not resumable; start again with a new -o")
    out = args.output
    if (out / "checkpoints").is_dir() or (out / "local").exists():
        raise PanguLightError(f"{out} already holds a run; choose another -o")
    graph = _graph(args.pruned)
    total = None if args.time_budget is None else parse_duration(args.time_budget)
    config, global_batch = config_from_args(args, graph, out, time_budget=total)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    history, local_s, local_tokens, capture_s, layers = [], 0.0, 0, 0.0, []
    stages, student, teacher, eval_teacher = Stages(), None, None, None
    if args.local_fraction > 0:
        with stages("reimport"):
            student = reimport(graph, attn_implementation=attention_for(graph, args.attn))
        with stages("teacher_load"):
            teacher = load_hf_model(config.teacher_dir)
        teacher.requires_grad_(False)
        # The first --local-samples windows of the seeded order train the layers; the next 4 (outside
        # the local stage, and not the evaluation split the curves report) measure each layer's error.
        count = min(args.local_samples, len(config.train_windows) - 1)
        order = schedule_windows(len(config.train_windows), args.seed, 0, min(count + 4, len(config.train_windows)))
        windows, check = config.train_windows[np.sort(order[:count])], config.train_windows[np.sort(order[count:])]
        with stages("eval_teacher"):  # once, for this evaluation and every one of the KD stage
            eval_teacher = [teacher_hidden(teacher, ids) for _, ids in
                            eval_chunks(config.eval_windows, args.batch_size, config.eval_sources)]
        started = budget_clock.clock()
        with stages("local_first_eval"):  # the clocks read before it, as distill's evaluations read them
            clocks = stamp({})
            history.append({"stage": "local", "step": 0, "tokens": 0, **heldout_metrics(
                student.model, teacher, config.eval_windows, batch=args.batch_size, bf16=args.bf16,
                sources=config.eval_sources, teacher_states=eval_teacher), "elapsed_s": 0.0, **clocks})
        say(f"start: held-out perplexity {history[0]['eval_perplexity']:.3f}, KL {history[0]['eval_kl']:.4f}")
        spent = budget_clock.clock() - started
        local = LocalConfig(
            windows, check, out / "local", student.spec.origin, lr=args.local_lr,
            micro_batch=args.batch_size, loss=args.local_loss, steps_per_layer=args.local_steps,
            time_budget=None if total is None else max(total * args.local_fraction - spent, 1e-9),
            bf16=args.bf16, clip=args.clip, seed=args.seed, quiet=args.quiet,
        )
        result = reconstruct(student.model, teacher, local)
        stages.seconds["local_capture"] = round(result.capture_s, 3)
        stages.cpu["local_capture"] = round(result.capture_cpu_s, 3)
        layers = result.layers
        local_s, local_tokens, capture_s = budget_clock.clock() - started - result.capture_s, result.tokens, \
            result.capture_s
        for layer in layers:
            history.append({"stage": "local", **layer, "elapsed_s": spent + layer["elapsed_s"],
                            "tokens": local_tokens})  # wall_s and cpu_s: stamped by reconstruct
        weights = out / "local" / "weights.pt"
        with atomic_write(weights) as temporary:
            torch.save(student.model.state_dict(), temporary)
        write_json(out / "local" / "layers.json", {"layers": layers, "seconds": local_s, "tokens": local_tokens})
        say(f"... local reconstruction took {local_s:.1f} s (and {capture_s:.1f} s to capture the teacher)")
        config = dataclasses.replace(config, init_weights=weights)
    if total is not None:
        config = dataclasses.replace(config, time_budget=max(total - local_s, 1e-9))
    # The KD stage trains the module the local stage left (its weights are also weights.pt) and
    # uses the teacher already loaded: no second re-import of the graph or load of the teacher.
    result = distill(config, student=student, teacher=teacher, stages=stages, eval_teacher=eval_teacher)
    for entry in result.history:
        history.append({**entry, "stage": "kd", "elapsed_s": entry.get("elapsed_s", 0.0) + local_s,
                        "tokens": entry.get("tokens", 0) + local_tokens})
    write_text(out / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))
    plot_history(history, out / "loss.png", x=args.plot_axis)
    summary = json.loads((out / "summary.json").read_text())
    summary["recover"] = {
        "time_budget_s": total, "local_fraction": args.local_fraction, "local_s": local_s,
        "kd_s": summary["train_s"], "total_s": local_s + summary["train_s"], "local_tokens": local_tokens,
        "capture_s": capture_s,
        "local_loss": args.local_loss, "local_lr": args.local_lr, "layers": layers,
    }
    write_json(out / "summary.json", summary)
    report(result, args, global_batch)
    trained = [layer for layer in layers if layer["steps"]]
    if trained:
        worst = max(layer["error_end"] / max(layer["error_start"], 1e-30) for layer in trained)
        print(f"local reconstruction: {len(trained)} of {len(layers)} layers trained in {local_s:.1f} s; layer "
              f"error ratio (end / start) at most {worst:.2f}; then KD for {summary['train_s']:.1f} s")
    return 0
