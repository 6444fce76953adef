"""Local reconstruction: each pruned decoder layer trained, alone, to reproduce the unpruned model's
residual stream across the teacher layers it stands for (a recovery stage before KD; no lm_head).

With P [H, k] the hidden map and student layer j standing for teacher layers [a_j, b_j)
(``hidden_map``: the dropped layers after a kept one are the kept one's to reproduce), the
teacher's residual stream r_i (the input of teacher layer i; r_N the input of the final norm) is
captured once with forward pre-hooks, mapped to x_i = r_i P and stored on disk. Layer j is then
trained on the teacher's own inputs (teacher forcing, so the layers are independent and run one
after another, holding two boundaries in memory)::

    y_j = f_j(x_{a_j})                              the student layer on the teacher's input
    mse     L_j = mean ||y_j - x_{b_j}||^2 / s_j     s_j = mean ||x_{b_j} - x_{a_j}||^2 (fixed)
    cosine  L_j = mean_tokens (1 - cos(y_j, x_{b_j}))

AdamW on layer j's weights only, the learning rate on a cosine from ``lr`` to lr / 10 over the
layer's share of the time (or its step cap). Every layer's error is measured on held-out windows
as e_j = sum ||y_j - x_{b_j}||^2 / sum ||x_{b_j} - x_{a_j}||^2 (1 is a layer that adds nothing
the teacher's would, 0 a perfect copy) before and after; a layer whose error did not fall (a few
steps of a tight budget can overshoot) is put back as it was.

Time: with a budget B (seconds of training and per-layer evaluation; the capture is set-up, like
distill's teacher cache, and reported apart) layer j may use (B - elapsed) / (layers left), and
takes another step while its mean step still fits (always one); once B is spent, the layers left
are not trained (``steps`` 0), so the stage ends within one layer's step and evaluations of B.

The layer is called with the keyword arguments the model itself passes it (rotary cos/sin for
its layer type, the causal or sliding-window mask), captured by a pre-hook on one forward of the
student over a batch of the same shape, so any family's layer runs as in the whole model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.distill import budget as budget_clock
from pangu_light.frontend.distill.hidden_map import hidden_map, layer_spans
from pangu_light.frontend.distill.usage import cpu_seconds, stamp

__all__ = ["LocalConfig", "LocalResult", "heldout_metrics", "layer_error", "reconstruct"]


@dataclasses.dataclass
class LocalConfig:
    train_windows: np.ndarray  # [W, L] token ids
    eval_windows: np.ndarray  # [E, L] held-out token ids (per-layer errors)
    work_dir: Path  # the teacher's boundaries, as .npy files (deleted at the end)
    origin: list[int]  # original index of each student layer
    lr: float = 1e-3
    micro_batch: int = 4
    loss: str = "mse"  # or "cosine"
    steps_per_layer: int = 200  # cap per layer
    time_budget: float | None = None  # seconds for the whole stage
    bf16: bool = True
    clip: float = 1.0
    seed: int = 0
    quiet: bool = False


@dataclasses.dataclass
class LocalResult:
    layers: list[dict[str, Any]]  # per layer: span, steps, held-out error at start and end
    elapsed_s: float
    tokens: int  # training-window tokens the teacher was run over
    capture_s: float = 0.0  # the capture of the teacher's boundaries (not in elapsed_s)
    capture_cpu_s: float = 0.0  # its CPU seconds


def reconstruct(student: torch.nn.Module, teacher: torch.nn.Module, config: LocalConfig) -> LocalResult:
    """Train each layer of ``student`` (a HF causal LM, in place) towards ``teacher``'s residual stream."""
    if config.loss not in ("mse", "cosine"):
        raise PanguLightError(f"--local-loss {config.loss!r}: use mse or cosine")
    say = (lambda m: None) if config.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    started, cpu_started = budget_clock.clock(), cpu_seconds()
    n_teacher = len(teacher.model.layers)
    spans = layer_spans(list(config.origin), n_teacher)
    if len(spans) != len(student.model.layers):
        raise PanguLightError(f"{len(config.origin)} layer origins for a student of {len(student.model.layers)} layers")
    p = hidden_map(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    boundaries = sorted({a for a, _ in spans} | {n_teacher})
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say(f"... local reconstruction: capturing the teacher's residual stream at {len(boundaries)} boundaries")
    train = _capture(teacher, config.train_windows, boundaries, p, work / "train", config.micro_batch)
    held = _capture(teacher, config.eval_windows, boundaries, p, work / "eval", config.micro_batch)
    capture_s, capture_cpu_s = budget_clock.clock() - started, cpu_seconds() - cpu_started
    started = budget_clock.clock()  # the budget is the layers' (the capture is set-up, as distill's teacher cache)
    student.requires_grad_(False)
    calls = _LayerCall(student)
    results = []
    try:
        for j, (a, b) in enumerate(spans):
            elapsed = budget_clock.clock() - started
            share = None if config.time_budget is None else (config.time_budget - elapsed) / (len(spans) - j)
            if share is not None and share <= 0:  # the budget is spent: the rest stay as pruned
                results.append(stamp({"layer": j, "span": [a, b], "steps": 0, "error_start": None,
                                      "error_end": None, "kept": True, "elapsed_s": elapsed}))
                continue
            layer = student.model.layers[j]
            call = functools.partial(calls, j)
            x_eval, y_eval = np.load(held[a]), np.load(held[b])
            start_error = layer_error(layer, call, x_eval, y_eval, config.micro_batch)
            saved = {k: v.clone() for k, v in layer.state_dict().items()}
            steps, loss = _train_layer(layer, call, np.load(train[a]), np.load(train[b]), config, share, j)
            end_error = layer_error(layer, call, x_eval, y_eval, config.micro_batch)
            kept = end_error <= start_error
            if not kept:  # too few steps to help (a tight budget): keep the layer as it was
                layer.load_state_dict(saved)
                end_error = start_error
            results.append(stamp({"layer": j, "span": [a, b], "steps": steps, "train_loss": loss,
                                  "error_start": start_error, "error_end": end_error, "kept": kept,
                                  "elapsed_s": budget_clock.clock() - started}))
            say(f"    layer {j} (teacher {a}..{b - 1}): {steps} steps, held-out error {start_error:.4f} -> "
                f"{end_error:.4f}")
    finally:
        for path in list(train.values()) + list(held.values()):
            path.unlink(missing_ok=True)
        student.requires_grad_(True)
    tokens = int(config.train_windows.size)
    return LocalResult(results, budget_clock.clock() - started, tokens, capture_s, capture_cpu_s)


# ----------------------------------------------------------------------------- the teacher's side


@torch.no_grad()
def _capture(teacher, windows: np.ndarray, boundaries: list[int], p: torch.Tensor, prefix: Path,
             batch: int) -> dict[int, Path]:
    """r_i P for each boundary i over ``windows``, one .npy file [W, L, k] per boundary."""
    n = len(teacher.model.layers)
    shape = (len(windows), windows.shape[1], p.shape[1])
    paths = {i: prefix.with_name(f"{prefix.name}-{i:03d}.npy") for i in boundaries}
    arrays = {i: np.lib.format.open_memmap(paths[i], mode="w+", dtype=np.float32, shape=shape) for i in boundaries}
    rows = slice(0, 0)

    def store(i):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            arrays[i][rows] = (hidden.float() @ p).numpy()
        return hook

    modules = {i: (teacher.model.layers[i] if i < n else teacher.model.norm) for i in boundaries}
    handles = [modules[i].register_forward_pre_hook(store(i), with_kwargs=True) for i in boundaries]
    try:
        for start in range(0, len(windows), batch):
            rows = slice(start, min(start + batch, len(windows)))
            teacher.model(input_ids=torch.from_numpy(np.ascontiguousarray(windows[rows], dtype=np.int64)),
                          use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for array in arrays.values():
        array.flush()
    arrays.clear()  # close the memory maps
    return paths


# ----------------------------------------------------------------------------- the student's side


class _LayerCall:
    """Calls student layer j as the model does: the keyword arguments the model passes each layer
    for a batch of a given shape (captured for every layer by pre-hooks on one forward)."""

    def __init__(self, student):
        self.student = student
        self.kwargs: dict[tuple[int, int], list[dict[str, Any]]] = {}

    def __call__(self, j: int, layer, hidden: torch.Tensor) -> torch.Tensor:
        key = tuple(hidden.shape[:2])
        if key not in self.kwargs:
            self.kwargs[key] = self._capture(*key)
        out = layer(hidden, **self.kwargs[key][j])
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def _capture(self, batch: int, length: int) -> list[dict[str, Any]]:
        layers = self.student.model.layers
        seen: list[dict[str, Any]] = [{} for _ in layers]

        def hook(j):
            def record(_module, args, kwargs):
                seen[j].update({k: v for k, v in kwargs.items() if k != "hidden_states"})
                if j == len(layers) - 1:
                    raise _Captured
            return record

        handles = [layer.register_forward_pre_hook(hook(j), with_kwargs=True) for j, layer in enumerate(layers)]
        try:
            self.student.model(input_ids=torch.zeros(batch, length, dtype=torch.long), use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return seen


class _Captured(Exception):
    pass


def _loss(y: torch.Tensor, target: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    if kind == "cosine":
        return (1.0 - torch.nn.functional.cosine_similarity(y, target, dim=-1)).mean()
    return (y - target).pow(2).sum(-1).mean() / scale


def _train_layer(layer, call: _LayerCall, x: np.ndarray, y: np.ndarray, c: LocalConfig, share: float | None,
                 j: int) -> tuple[int, float]:
    """Steps of AdamW on ``layer`` alone; returns (steps taken, the last training loss)."""
    layer.requires_grad_(True)
    params = [q for q in layer.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scale = float(np.mean(np.sum((y.astype(np.float64) - x) ** 2, axis=-1))) or 1.0
    rng = np.random.default_rng([c.seed, j])
    order = np.empty(0, dtype=np.int64)
    started = budget_clock.clock()
    step, loss_value = 0, float("nan")
    layer.train()
    while step < c.steps_per_layer:
        spent = budget_clock.clock() - started
        if share is not None and step > 0 and spent + spent / step > share:
            break
        progress = step / c.steps_per_layer if share is None else max(step / c.steps_per_layer, spent / share)
        for group in optimizer.param_groups:
            group["lr"] = c.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
        if len(order) < c.micro_batch:
            order = np.concatenate([order, rng.permutation(len(x))])
        rows, order = np.sort(order[:c.micro_batch]), order[c.micro_batch:]
        inputs, target = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
            out = call(layer, inputs)
        loss = _loss(out.float(), target, c.loss, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.clip)
        optimizer.step()
        loss_value = float(loss.detach())
        step += 1
    layer.eval()
    layer.requires_grad_(False)
    return step, loss_value


@torch.no_grad()
def layer_error(layer, call, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """sum ||f(x) - y||^2 / sum ||y - x||^2 over the windows (float32): the layer's relative error."""
    was_training = layer.training
    layer.eval()
    error = reference = 0.0
    for start in range(0, len(x), batch):
        inputs, target = torch.from_numpy(x[start:start + batch]), torch.from_numpy(y[start:start + batch])
        out = call(layer, inputs).float()
        error += float((out - target).double().pow(2).sum())
        reference += float((target - inputs).double().pow(2).sum())
    layer.train(was_training)
    return error / max(reference, 1e-30)


@torch.no_grad()
def heldout_metrics(student, teacher, windows: np.ndarray, *, batch: int, bf16: bool, sources=None,
                    teacher_states: list[torch.Tensor] | None = None) -> dict[str, float]:
    """The whole student's held-out KL to the teacher and perplexity (T = 1), computed as distill's
    evaluation computes them (the student forward and the fused loss, under the same autocast, per
    source of ``sources``), from the teacher's final hidden states on ``evaluation.eval_chunks``
    when given (``teacher_states``)."""
    from pangu_light.frontend.distill.evaluation import EvalTotals, eval_chunks
    from pangu_light.frontend.distill.objective import DistillObjective, next_token_targets
    from pangu_light.frontend.kd_loss import KDLossOptions
    from pangu_light.frontend.teacher_cache import teacher_hidden

    objective = DistillObjective(student, bf16, "cpu")
    options = KDLossOptions(student_softcap=getattr(student.config, "final_logit_softcapping", None),
                            teacher_softcap=getattr(teacher.config, "final_logit_softcapping", None),
                            matmul_dtype=torch.bfloat16 if bf16 else torch.float32)
    head = teacher.get_output_embeddings().weight.detach()
    was_training = student.training
    student.eval()
    totals = EvalTotals()
    for k, (name, ids) in enumerate(eval_chunks(windows, batch, sources)):
        targets = next_token_targets(ids)
        states = teacher_hidden(teacher, ids) if teacher_states is None else teacher_states[k]
        _, kl, ce = objective(ids, states, head, targets, options)
        totals.add(name, float(kl), ids.numel(), float(ce), int((targets >= 0).sum()))
    student.train(was_training)
    return totals.metrics()
