"""Data parallelism under torchrun: start the process group once, then ask which process this is.

`python -m sd train` calls `init_distributed()` once, before any stage; everything else only asks
`rank_and_world()`, which starts nothing. Outside torchrun there is one process: rank 0 of 1.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..runtime.device import resolve_device

# torchrun sets it to the number of processes of the run.
WORLD_SIZE_ENV = "WORLD_SIZE"


def launched_processes() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get(WORLD_SIZE_ENV, "1"))


def init_distributed() -> tuple[int, int]:
    """Start the process group when run under torchrun (gloo on CPU, NCCL on GPUs); returns (rank, world size)."""
    if launched_processes() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(resolve_device("cuda"))   # this process's GPU, for NCCL's own communications
        # NCCL for the gradients on GPUs, gloo for the small CPU tensors of `agree` (NCCL only takes GPU tensors)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def close_distributed() -> None:
    """End the process group that init_distributed started (torch warns at exit otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) outside one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched_processes() > 1:
        raise RuntimeError(f"torchrun started {launched_processes()} processes but this one has no process group: "
                           "call sd.training.init_distributed() first")
    return 0, 1


def agree(*values: float) -> list[float]:
    """The largest of each value over all processes, so that every rank takes the same decision (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def wait_for_all() -> None:
    """Block until every process gets here (nothing to wait for outside a process group)."""
    if dist.is_initialized():
        dist.barrier()
