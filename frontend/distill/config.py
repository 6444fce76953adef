"""What a distillation run is given (``DistillConfig``) and returns (``DistillResult``), the checks
on its numbers that fail before any model is loaded, and the fingerprint a resumed run must match."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from pangu_light.core.errors import PanguLightError

__all__ = ["DistillConfig", "DistillResult", "check_config", "file_digest"]


@dataclasses.dataclass
class DistillConfig:
    graph: Path  # the pruned ONNX graph (the student)
    teacher_dir: Path  # the unpruned teacher, a local HF directory
    output: Path
    train_windows: np.ndarray  # [W, L] token ids (calibration split)
    eval_windows: np.ndarray  # [E, L] token ids (evaluation split)
    eval_sources: tuple[tuple[str, int], ...] | None = None  # (name, windows) in order, each reported apart
    tokenizer_dir: Path | None = None
    steps: int = 100
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0  # the warm-up's steps (at least, with a fraction)
    warmup_fraction: float = 0.0  # the warm-up's share of the run (of its steps, or of the time budget)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    bf16: bool = True
    chunk: int = 256
    seed: int = 0
    online_teacher: bool = False
    teacher_cache_dir: Path | None = None  # default: OUTPUT/teacher_cache
    teacher_cache_dtype: str = "float32"
    eval_every: int = 25
    eval_interval: float | None = None  # also evaluate once this many training seconds passed since the last
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool | Path = False  # True: the latest checkpoint in OUTPUT/checkpoints
    fsdp: bool = False
    attn_implementation: str | None = None  # default: sdpa (eager for Gemma2's soft-capping)
    export: bool = True
    quiet: bool = False
    time_budget: float | None = None  # seconds of training (after the set-up); steps is then a cap
    kd: str = "full"  # "full": KL over the whole vocabulary; "topk": the teacher's top-k plus a tail bucket
    top_k: int = 64
    plot_axis: str = "tokens"  # x axis of loss.png: "tokens" or "seconds"
    init_weights: Path | None = None  # a student state_dict (torch.save) to start from, e.g. local reconstruction's
    freeze_embeddings: bool = False  # keep the embedding and lm_head fixed (needs the teacher's hidden size)

    def fingerprint(self, graph_digest: str, teacher_id: str) -> dict[str, Any]:
        """What fixes the training curve: a resumed run must agree on all of it."""
        return {
            "graph": graph_digest, "teacher": teacher_id,
            "train_windows": _windows_digest(self.train_windows), "eval_windows": _windows_digest(self.eval_windows),
            "steps": self.steps, "micro_batch": self.micro_batch, "lr": self.lr,
            "min_lr_ratio": self.min_lr_ratio, "warmup_steps": self.warmup_steps,
            "warmup_fraction": self.warmup_fraction,
            "weight_decay": self.weight_decay, "betas": list(self.betas), "clip": self.clip,
            "temperature": self.temperature, "ce_weight": self.ce_weight, "bf16": self.bf16, "seed": self.seed,
            "time_budget": self.time_budget, "top_k": self.top_k if self.kd == "topk" else None,
            "init_weights": file_digest(Path(self.init_weights)) if self.init_weights else None,
            "freeze_embeddings": self.freeze_embeddings,
        }


@dataclasses.dataclass
class DistillResult:
    output: Path
    steps: int  # steps taken (fewer than config.steps when the time budget ran out)
    history: list[dict[str, Any]]
    model_dir: Path | None
    model_format: str | None
    graph: Path | None
    export_max_abs_diff: float | None
    stopped: str = "steps"  # "steps" or "time_budget"


def check_config(config: DistillConfig) -> None:
    """Refuse counts below 1, a loss mix outside [0, 1], a non-positive temperature or learning
    rate, and empty training or evaluation windows, each with the option to change."""
    for name in ("steps", "micro_batch", "grad_accum", "chunk", "eval_every", "save_every", "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise PanguLightError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(config, name)})")
    if not 0.0 <= config.ce_weight <= 1.0:
        raise PanguLightError(f"--ce-weight {config.ce_weight} must be between 0 (pure KL) and 1 (pure CE)")
    if config.temperature <= 0:
        raise PanguLightError(f"--temperature {config.temperature} must be positive")
    if config.eval_interval is not None and config.eval_interval <= 0:
        raise PanguLightError(f"--eval-interval {config.eval_interval} s must be positive")
    if config.time_budget is not None and config.time_budget <= 0:
        raise PanguLightError(f"--time-budget {config.time_budget} s must be positive")
    if config.kd not in ("full", "topk"):
        raise PanguLightError(f"--kd {config.kd!r}: use full (the exact reference) or topk")
    if config.kd == "topk" and config.top_k < 1:
        raise PanguLightError(f"--top-k must be at least 1 (got {config.top_k})")
    if config.plot_axis not in ("tokens", "seconds"):
        raise PanguLightError(f"plot axis {config.plot_axis!r}: use tokens or seconds")
    if config.init_weights is not None and not Path(config.init_weights).is_file():
        raise PanguLightError(f"initial weights {config.init_weights}: no such file")
    if config.warmup_steps < 0:
        raise PanguLightError(f"--warmup {config.warmup_steps} steps must be 0 or more")
    if not 0.0 <= config.warmup_fraction < 1.0:
        raise PanguLightError(f"--warmup fraction {config.warmup_fraction} must be at least 0 and below 1")
    if config.warmup_fraction > 0 and config.warmup_steps < 1:
        raise PanguLightError("a warm-up fraction needs at least one warm-up step (warmup_steps >= 1)")
    if config.lr <= 0:
        raise PanguLightError(f"--lr {config.lr} must be positive")
    if config.train_windows.ndim != 2 or len(config.train_windows) < 1:
        raise PanguLightError("no training windows: pass more text or a shorter --seq-len")
    if config.eval_windows.ndim != 2 or len(config.eval_windows) < 1:
        raise PanguLightError("no evaluation windows: pass more text or fewer --eval-samples")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _windows_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.int64).tobytes()).hexdigest()[:16]
