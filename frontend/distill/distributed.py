"""One process or many under ``torchrun``: the process group, and the student wrapped for it.

With ``WORLD_SIZE`` > 1 the student is wrapped in DistributedDataParallel (gloo on CPU, nccl on
GPU) or, with ``fsdp``, sharded with FSDP2 ``fully_shard`` (each decoder layer, then the whole).
Only rank 0 (``Dist.main``) writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable

import torch

__all__ = ["Dist", "init_distributed", "wrap_for_training"]


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """The process group of a ``torchrun`` launch (joined here if nobody has yet); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    initialized_here = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        # Rank 0 may build the teacher cache while the others wait: allow hours.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
        initialized_here = True
    return Dist(dist.get_rank(), dist.get_world_size(), device, initialized_here)


def wrap_for_training(objective: torch.nn.Module, dist: Dist, *, fsdp: bool,
                      say: Callable[[str], None]) -> torch.nn.Module:
    """``objective`` itself in one process, else DDP around it or (``fsdp``) it sharded in place."""
    if dist.world == 1:
        if fsdp:
            say("... --fsdp has no effect in one process (run under torchrun to shard)")
        return objective
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in objective.student.model.layers:
            fully_shard(layer)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids)
