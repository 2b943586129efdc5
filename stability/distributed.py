"""Distributed training on PyTorch's own engine: torchrun starts the processes, this module
joins them into a process group and holds the few collectives the trainer needs.

    torchrun --nproc_per_node 2 -m stability train ...

``Dist`` describes the process: its rank, the world size, and how the model is
parallelised (``ddp`` replicates it, ``fsdp`` shards it with FSDP2's ``fully_shard``). A
run with one process gets ``Dist()`` and every helper here is a no-op, so call sites never
branch on it.

What keeps ranks in step:
- every decision is made from values every rank has reduced the same way: the guard's
  verdict flags and the mean loss (one all-reduce per step, no host sync), the stop flag and
  validation sums (at sync points, where the host reads anyway);
- rank 0 alone writes files; the others wait at a barrier when they must read them;
- rank 0 goes first where a cache is filled (the tokenizer, the token streams) and tells
  the others whether it worked, so an error on rank 0 is an error on every rank and no rank
  is left waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # "none" with one process, else "ddp" or "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


class DistError(ValueError):
    """A launch problem: the message names the flag or variable and what to do."""


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(requested: str, device: str) -> Dist:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on
    the CPU); with one process, ``Dist()``. ``requested`` is --distributed."""
    if not launched():
        if requested == "fsdp":
            raise DistError("--distributed fsdp shards the model over several processes; launch with "
                            "torchrun --nproc_per_node N (N >= 2), or drop the flag")
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} CUDA devices; "
                            "lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank, "fsdp" if requested == "fsdp" else "ddp")


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def device_of(d: Dist, device: torch.device) -> torch.device:
    """Each rank's own GPU."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.active else device


# --- collectives, no-ops with one process --------------------------------------------------


def all_reduce_(d: Dist, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over the ranks (``sum``, ``mean`` or ``max``); no host sync."""
    if d.active:
        if op == "mean":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(d.world)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def any_rank(d: Dist, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a host value: only where the host reads anyway)."""
    if not d.active:
        return flag
    t = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # host sync, at a sync point


def gather(d: Dist, obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (pickled: small objects only)."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_signal(d: Dist, signum: int | None) -> int | None:
    """The first signal any rank got (``signum``: this rank's, or None), on every rank; a
    host read, so only where the host reads anyway."""
    if not d.active:
        return signum
    signals = gather(d, signum) if any_rank(d, signum is not None) else []
    return next((s for s in signals if s is not None), None)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def main_first(d: Dist, fn: Callable[[], T], errors: tuple[type[BaseException], ...], others: bool = True) -> T:
    """Run ``fn`` on rank 0, then (``others``) on the other ranks, which then find rank 0's
    caches. An error of ``errors`` on rank 0 is raised on every rank, with rank 0's
    message, so no rank goes on into a collective the others never reach."""
    if not d.active:
        return fn()
    failure, result = None, None
    if d.main:
        try:
            result = fn()
        except errors as e:
            failure = e
    failure = broadcast(d, failure)
    if failure is not None:
        raise failure
    if not d.main and others:
        result = fn()
    return result


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# --- the model --------------------------------------------------------------------------------


def wrap(d: Dist, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> nn.Module:
    """The module the training step calls: ``model`` itself with one process or under FSDP2
    (``fully_shard`` turns it into its own sharded version, per block then the root), a
    DistributedDataParallel wrapper under DDP. Everything else reads ``model``."""
    if d.mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if d.mode == "fsdp":
        import warnings

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # FSDP2 warns when a block returns a view (the LIF's spike trains are): only an in-place
        # op on that output could skip its all-gather, and no module of lsnn writes into one
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        # bf16 compute with fp32 gradient reduction; fp32 without --mixed-precision
        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective for a sharded one, no host sync); other tensors as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage); other tensors as they are."""
    return tensor.to_local() if is_sharded(tensor) else tensor
