"""Checkpoints of a distillation run: their format, writing them (rank 0, atomically, keeping the
last few), and resuming from one exactly where it left off.

A checkpoint ``OUTPUT/checkpoints/step-NNNNNN.pt`` holds the full (unsharded) student weights,
the AdamW and schedule state, the history, the torch RNG state, the student's shape description
and the run's fingerprint; a resume with another fingerprint is refused, since it would not
continue the same curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write
from pangu_light.frontend.distill.config import DistillConfig

__all__ = ["CHECKPOINT_DIR", "checkpoint_to_resume", "full_state", "resume_from", "write_checkpoint"]

CHECKPOINT_FORMAT = "pangu-light-distill-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


def checkpoint_to_resume(config: DistillConfig) -> Path | None:
    """The checkpoint ``config.resume`` names (True: the latest in OUTPUT), or None for a new run;
    refuses a new run in a directory that holds one already, and an output that is a file."""
    out = Path(config.output)
    directory = out / CHECKPOINT_DIR
    if config.resume:
        if isinstance(config.resume, (str, Path)) and not isinstance(config.resume, bool):
            path = Path(config.resume)
            if not path.is_file():
                raise PanguLightError(f"checkpoint {path}: no such file")
            return path
        found = sorted(directory.glob("step-*.pt"))
        if not found:
            raise PanguLightError(f"--resume: {directory} holds no checkpoint; start without --resume")
        return found[-1]
    if directory.is_dir() and any(directory.glob("step-*.pt")):
        raise PanguLightError(
            f"{out} already holds a distillation run (checkpoints in {directory}): pass --resume to "
            "continue it, or choose another -o"
        )
    if out.exists() and not out.is_dir():
        raise PanguLightError(f"output {out} is a file; pass a directory")
    return None


def full_state(model: torch.nn.Module, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
               sharded: bool) -> tuple[dict, dict]:
    """The student's and the optimizer's full state dicts; under FSDP a collective that every
    rank must call (the shards are gathered onto the CPU)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {k.removeprefix("student."): v for k, v in model_state.items()}, optim_state
    return objective.student.state_dict(), optimizer.state_dict()


def write_checkpoint(directory: Path, *, step: int, tokens: int, model_state: dict, optim_state: dict,
                     scheduler_state: dict, history: list[dict[str, Any]], fingerprint: dict[str, Any],
                     sharded: bool, spec: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNN.pt`` atomically and delete all but the ``keep`` newest checkpoints."""
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
        "tokens": tokens, "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "optimizer": optim_state, "scheduler": scheduler_state, "history": history,
        "fingerprint": fingerprint, "fsdp": sharded, "torch_rng": torch.get_rng_state(), "spec": spec,
    }
    path = directory / f"step-{step:06d}.pt"
    with atomic_write(path) as temporary:
        torch.save(payload, temporary)
    for old in sorted(directory.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def resume_from(path: Path, *, fingerprint: dict[str, Any], model: torch.nn.Module, objective: torch.nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, sharded: bool) -> tuple[list[dict[str, Any]], int, int]:
    """Load the checkpoint at ``path`` into the student, optimizer, schedule and torch RNG;
    returns (history, step, tokens seen)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("version") != CHECKPOINT_VERSION:
        raise PanguLightError(f"{path} is not a pangu-light distillation checkpoint")
    differs = [k for k, v in fingerprint.items() if payload["fingerprint"].get(k) != v]
    if differs:
        raise PanguLightError(
            f"{path} was made with other settings ({', '.join(differs)} differ); resume with the same "
            "graph, teacher, data and options, or start a new run in another directory"
        )
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model, optimizer,
            model_state_dict={f"student.{k}": v for k, v in payload["model"].items()},
            optim_state_dict=payload["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        objective.student.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["torch_rng"])
    return list(payload["history"]), int(payload["step"]), int(payload["tokens"])
