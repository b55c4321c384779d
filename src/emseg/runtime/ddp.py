"""Data-parallel training under ``torchrun``: the process group :func:`emseg.engine.training.run_training` uses.

:class:`ProcessGroup` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, joins the torch.distributed
group (gloo on CPU, nccl on CUDA) and averages gradients with DistributedDataParallel; in a single
process every method is the identity.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from emseg.errors import InputError


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose unknown attributes (``divisor``, ``ndim``...) come from the network."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@dataclass
class ProcessGroup:
    """The data-parallel context of one training process.

    :meth:`from_env` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``) and
    joins the process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); otherwise every
    method is the identity, so a single process behaves exactly as without it.

    Examples
    --------
    >>> group = ProcessGroup.from_env()
    >>> group.world_size, group.rank, group.is_main
    (1, 0, True)
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls) -> "ProcessGroup":
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise InputError("this torch build has no torch.distributed support")
        return cls(world, rank, local)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """Join the group; the device of this process (``cuda:LOCAL_RANK`` on GPUs)."""
        if not self.active:
            return device
        if device.type == "mps":  # neither nccl nor gloo reduces MPS tensors
            raise InputError(f"training on {self.world_size} processes needs CUDA GPUs or the CPU, not Apple's MPS "
                             f"(train on MPS in one process, or set `device` to cpu)")
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(device)
        self.device = device
        if not dist.is_initialized():
            # Joined once per process and kept: a process may train several times (an active
            # learning loop, say), and torchrun's store does not support joining a second time.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    rank=self.rank, world_size=self.world_size)
            atexit.register(_leave_process_group)
        elif dist.get_world_size() != self.world_size:
            raise InputError(f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says "
                             f"{self.world_size}")
        return device

    def wrap(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model the loss sees: DistributedDataParallel (rank 0's weights broadcast) or as is."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return _DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.float64, device=self.device)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over processes (NaN/inf anywhere stays non-finite)."""
        if not self.active:
            return value
        t = self._tensor([value])
        dist.all_reduce(t)
        return float(t[0]) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one of them."""
        if not self.active:
            return flag
        t = self._tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0] > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in rank order (on every process)."""
        if not self.active:
            return [obj]
        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, obj)
        return boxes

    def rng_state(self, state: dict[str, Any], source: str) -> dict[str, Any]:
        """This process's random state in a checkpoint (rank r restores ``rng_ranks[r]``)."""
        stored = int(state.get("world_size", 1))
        if stored != self.world_size:
            raise InputError(f"checkpoint was written by {stored} training process(es), this run has "
                             f"{self.world_size}: resume with the same process count", source=source)
        return state["rng_ranks"][self.rank] if self.active else state["rng"]

    def barrier(self) -> None:
        """Wait until every process gets here (rank 0's files are then complete)."""
        if self.active and dist.is_initialized():
            dist.barrier()


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
