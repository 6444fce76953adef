"""The training loop of a distillation run: set-up (student, teacher, optimizer, data), the
optimizer step over accumulated micro-batches, held-out evaluation (``evaluation``) at its steps,
metrics, checkpoints, and at the end the outputs. Every rank runs it; only rank 0 writes."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from pangu_light.core.files import write_text
from pangu_light.frontend.distill import budget as budget_clock
from pangu_light.frontend.distill.budget import Budget
from pangu_light.frontend.distill.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_to_resume,
    full_state,
    resume_from,
    write_checkpoint,
)
from pangu_light.frontend.distill.config import DistillConfig, DistillResult, check_config, file_digest
from pangu_light.frontend.distill.data import TrainingData
from pangu_light.frontend.distill.distributed import Dist, init_distributed, wrap_for_training
from pangu_light.frontend.distill.evaluation import evaluate
from pangu_light.frontend.distill.objective import (
    DistillObjective,
    attention_for,
    check_vocabulary,
    freeze_embeddings,
    loss_options,
    next_token_targets,
)
from pangu_light.frontend.distill.outputs import write_outputs
from pangu_light.frontend.distill.schedule import make_optimizer, make_scheduler, warmup_factor, warmup_record
from pangu_light.frontend.distill.usage import Stages, stamp
from pangu_light.frontend.kd_topk import TopKTeacher
from pangu_light.frontend.reimport import Reimported, reimport
from pangu_light.frontend.teacher_cache import teacher_identity
from pangu_light.reports.loss_plot import plot_history

__all__ = ["METRICS_FILE", "PLOT_FILE", "distill"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def distill(config: DistillConfig, *, student: Reimported | None = None, teacher: torch.nn.Module | None = None,
            stages: Stages | None = None, eval_teacher: list[torch.Tensor] | None = None) -> DistillResult:
    """Run (or resume) a distillation; returns what was written. Only rank 0 writes.

    ``student`` (``reimport(config.graph)``, its weights then replaced by ``config.init_weights``
    when given) and ``teacher`` (``load_hf_model(config.teacher_dir)``) spare a caller that holds
    them already (``recover``) loading them again, as ``eval_teacher`` (the teacher's final hidden
    states on ``evaluation.eval_chunks`` of the evaluation windows) does computing those again;
    ``stages`` collects the set-up's timings."""
    dist = init_distributed()
    try:
        return _Run(config, dist, student=student, teacher=teacher, stages=stages, eval_teacher=eval_teacher).run()
    finally:
        if dist.initialized_here:
            torch.distributed.destroy_process_group()


class _Run:
    def __init__(self, config: DistillConfig, dist: Dist, *, student: Reimported | None = None,
                 teacher: torch.nn.Module | None = None, stages: Stages | None = None,
                 eval_teacher: list[torch.Tensor] | None = None):
        self.c = config
        self.dist = dist
        self.given_student, self.given_teacher, self.given_eval_teacher = student, teacher, eval_teacher
        self.stages = Stages() if stages is None else stages
        self.out = Path(config.output)
        self.sharded = config.fsdp and dist.world > 1
        self.last_spent: float | None = None
        loud = dist.main and not config.quiet
        self.say = (lambda m: print(m, file=sys.stderr, flush=True)) if loud else (lambda m: None)

    def setup(self) -> None:
        c = self.c
        check_config(c)
        self.checkpoint = checkpoint_to_resume(c)
        torch.manual_seed(c.seed)
        from pangu_light.frontend.loading import load_hf_model

        with self.stages("reimport"):
            if self.given_student is None:
                self.say(f"... re-importing the student from {c.graph}")
                attention = attention_for(c.graph, c.attn_implementation)
                self.given_student = reimport(c.graph, attn_implementation=attention)
            self.student = self.given_student
            student = self.student.model
        with self.stages("teacher_load"):
            if self.given_teacher is None:
                self.say(f"... loading the teacher {c.teacher_dir}")
                self.given_teacher = load_hf_model(c.teacher_dir)
            teacher = self.given_teacher.to(self.dist.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        check_vocabulary(student, teacher)
        self.teacher_head = teacher.get_output_embeddings().weight.detach().to(self.dist.device)
        if c.init_weights is not None:
            student.load_state_dict(torch.load(c.init_weights, map_location="cpu", weights_only=True))
        if c.freeze_embeddings:
            freeze_embeddings(student, teacher)
        teacher_id = teacher_identity(c.teacher_dir)
        self.fingerprint = c.fingerprint(file_digest(Path(c.graph)), teacher_id)
        self.global_batch = c.micro_batch * c.grad_accum * self.dist.world
        self.seq_len = int(c.train_windows.shape[1])
        self.loss_options, self.eval_options = loss_options(c, student, teacher)
        student.train()
        student.to(self.dist.device)
        self.objective = DistillObjective(student, c.bf16, self.dist.device.type)
        self.model = wrap_for_training(self.objective, self.dist, fsdp=c.fsdp, say=self.say)
        self.optimizer = make_optimizer(self.model, c, sharded=self.sharded)
        self.budget: Budget | None = None
        self.scheduler = make_scheduler(self.optimizer, c, self.spent)
        self.history: list[dict[str, Any]] = []
        self.start_step = 0
        self.tokens_seen = 0
        self.data = TrainingData.prepare(c, self.dist, teacher=teacher, teacher_id=teacher_id,
                                         global_batch=self.global_batch, say=self.say, stages=self.stages,
                                         eval_teacher=self.given_eval_teacher)

    # -- metrics and checkpoints --------------------------------------------------------------
    def write_curves(self) -> None:
        """metrics.jsonl and loss.png of the history so far (rank 0)."""
        write_text(self.out / METRICS_FILE, "".join(json.dumps(entry) + "\n" for entry in self.history))
        plot_history(self.history, self.out / PLOT_FILE, x=self.c.plot_axis)

    def save_checkpoint(self, step: int) -> None:
        # A collective under FSDP: every rank gathers, rank 0 writes.
        model_state, optim_state = full_state(self.model, self.objective, self.optimizer, sharded=self.sharded)
        if not self.dist.main:
            return
        write_checkpoint(
            self.out / CHECKPOINT_DIR, step=step, tokens=self.tokens_seen, model_state=model_state,
            optim_state=optim_state, scheduler_state=self.scheduler.state_dict(), history=self.history,
            fingerprint=self.fingerprint, sharded=self.sharded, spec=self.student.spec.to_json(),
            keep=self.c.keep_checkpoints,
        )
        self.write_curves()

    def resume(self) -> None:
        self.history, self.start_step, self.tokens_seen = resume_from(
            self.checkpoint, fingerprint=self.fingerprint, model=self.model, objective=self.objective,
            optimizer=self.optimizer, scheduler=self.scheduler, sharded=self.sharded,
        )
        self.say(f"... resumed from {self.checkpoint} at step {self.start_step}")

    def spent(self) -> float | None:
        """The fraction of the time budget used (0 before training starts; None without a budget),
        kept as the schedule read it for the next step's learning rate."""
        if self.c.time_budget is not None:
            self.last_spent = 0.0 if self.budget is None else self.budget.progress()
        return self.last_spent

    # -- training -----------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches per rank; the losses averaged over ranks."""
        c = self.c
        device = self.dist.device
        start = budget_clock.clock()
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(3)
        for micro in range(c.grad_accum):
            ids, teacher = self.data.batch(step, micro)
            sync = micro == c.grad_accum - 1
            context = self.model.no_sync() if (hasattr(self.model, "no_sync") and not sync) else nullcontext()
            if isinstance(teacher, TopKTeacher):
                teacher_h, topk = None, tuple(t.to(device) for t in (teacher.log_p, teacher.index, teacher.tail))
            else:
                teacher_h, topk = teacher.to(device), None
            with context:
                loss, kl, ce = self.model(ids.to(device), teacher_h, self.teacher_head,
                                          next_token_targets(ids).to(device), self.loss_options, topk)
                (loss / c.grad_accum).backward()
            totals += torch.stack([loss.detach().cpu(), kl.cpu(), ce.cpu()]) / c.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        warm = warmup_factor(step, c.steps, c.warmup_steps, self.last_spent, c.warmup_fraction)
        self.optimizer.step()
        if self.dist.world > 1:
            torch.distributed.all_reduce(totals)
            totals /= self.dist.world
        seconds = max(budget_clock.clock() - start, 1e-9)  # a coarse (or a test's) clock may not move
        tokens = self.global_batch * self.seq_len
        self.tokens_seen += tokens
        loss, kl, ce = (float(v) for v in totals)
        return {"step": step + 1, "tokens": self.tokens_seen, "loss": loss, "kl": kl, "ce": ce, "lr": lr,
                "warmup": warm, "grad_norm": float(grad_norm), "seconds": seconds, "tokens_per_s": tokens / seconds}

    def run(self) -> DistillResult:
        c = self.c
        setup_started = budget_clock.clock()
        self.setup()
        if self.checkpoint is not None:
            self.resume()
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        setup_s = budget_clock.clock() - setup_started
        last = next((h for h in reversed(self.history) if "elapsed_s" in h), {})
        self.budget = Budget(self.dist, c.time_budget, already=last.get("elapsed_s", 0.0),
                             already_cpu=last.get("cpu_s", 0.0), already_wall=last.get("wall_s", 0.0))
        self.spent()  # after a resume: the clock the schedule read for the next step
        if c.time_budget is not None:
            self.say(f"... set-up took {setup_s:.1f} s; training for at most {c.time_budget:.0f} s "
                     f"(and at most {c.steps} steps)")
        if self.start_step == 0 and not self.history:
            with self.stages("first_eval"):
                self.history.append(self.evaluate_at(0))
            entry = self.history[-1]
            self.say(f"step 0: held-out perplexity {entry['eval_perplexity']:.3f}, "
                     f"KL to the teacher {entry['eval_kl']:.4f}")
        done, stopped = self.train(), "steps"
        if done < c.steps:
            stopped = "time_budget"
            self.say(f"... stopped on the time budget after {done} steps ({self.budget.elapsed:.1f} s)")
        if self.sharded:
            model_state = full_state(self.model, self.objective, self.optimizer, sharded=True)[0]
        else:
            model_state = self.objective.student.state_dict()
        result = DistillResult(self.out, done, self.history, None, None, None, None, stopped)
        if self.dist.main:
            self.write_curves()
            run_info = {"steps": done, "max_steps": c.steps, "stopped": stopped, "time_budget_s": c.time_budget,
                        "setup_s": setup_s, "train_s": self.budget.elapsed, "warmup": warmup_record(c, self.history)}
            # Without sharding the trained module itself is exported (no third re-import of the graph).
            trained = None if self.sharded else self.objective.student
            result = write_outputs(c, self.student, model_state, history=self.history, fingerprint=self.fingerprint,
                                   tokens=self.tokens_seen, global_batch=self.global_batch, world=self.dist.world,
                                   run_info=run_info, say=self.say, stages=self.stages, model=trained)
        self.dist.barrier()
        return result

    def evaluate_at(self, step: int) -> dict[str, Any]:
        """Held-out perplexity of the student and its KL to the teacher (T = 1), every rank, stamped
        with the elapsed training time at which the model was in that state."""
        elapsed = self.budget.tick()
        metrics = evaluate(self.model, self.data.eval_batches(), self.teacher_head, self.eval_options,
                           self.dist.device)
        entry = {"step": step, "tokens": self.tokens_seen, **metrics, "elapsed_s": elapsed}
        return stamp(entry, cpu=self.budget.cpu_s, wall=self.budget.wall_s)

    def train(self) -> int:
        """Steps until ``c.steps`` or the time budget; evaluates and checkpoints along the way and at
        the last step taken. Returns the number of steps done."""
        from tqdm import tqdm

        c = self.c
        bar = tqdm(total=c.steps, initial=self.start_step, unit="step", desc="distill", file=sys.stderr,
                   disable=c.quiet or not self.dist.main)
        done = evaluated = saved = self.start_step
        last_eval = next((h["elapsed_s"] for h in reversed(self.history) if "eval_kl" in h and "elapsed_s" in h), 0.0)
        for step in range(self.start_step, c.steps):
            before = self.budget.tick()
            if self.budget.exhausted():
                break
            if self.data.missing(step):  # the teacher cache's next chunk (a budgeted run): set-up time
                with self.budget.paused(), self.stages("teacher_cache"):
                    self.data.ensure(step, self.say)
                before = self.budget.tick()
            entry = self.train_step(step)
            entry["elapsed_s"] = self.budget.step_done(before)
            stamp(entry, cpu=self.budget.cpu_s, wall=self.budget.wall_s)
            self.scheduler.step()  # after the tick: a budgeted schedule reads the same time on every rank
            self.history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}", lr=f"{entry['lr']:.2e}")
            bar.update(1)
            done = step + 1
            timely = c.eval_interval is not None and entry["elapsed_s"] - last_eval >= c.eval_interval
            if done % c.eval_every == 0 or done == c.steps or timely:
                evaluated = self._evaluate_and_report(done, entry, bar)
                last_eval = self.history[-1]["elapsed_s"]
            if done % c.save_every == 0 or done == c.steps:
                self.save_checkpoint(done)
                saved = done
        bar.close()
        if evaluated != done:
            self._evaluate_and_report(done, self.history[-1], None)
        if saved != done:
            self.save_checkpoint(done)
        return done

    def _evaluate_and_report(self, done: int, entry: dict[str, Any], bar) -> int:
        evaluation = self.evaluate_at(done)
        self.history.append(evaluation)
        if self.dist.main and not self.c.quiet:
            message = (f"step {done}: held-out perplexity {evaluation['eval_perplexity']:.3f}, "
                       f"KL {evaluation['eval_kl']:.4f}, train loss {entry['loss']:.4f}")
            (bar.write if bar is not None else print)(message, file=sys.stderr)
        return done
