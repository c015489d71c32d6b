"""Process groups from torchrun's environment, the device each process uses, and rank-0 printing.

    info = init_distributed("auto")     # RANK/WORLD_SIZE/LOCAL_RANK set by torchrun, else one process
    print0(f"training on {info.device}")  # only rank 0 prints
    destroy_distributed()

Multi-node needs nothing more: torchrun's own rendezvous (--nnodes, --node-rank, --rdzv-endpoint) sets the
same variables on every node. The backend is nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU when there is one, else the CPU; 'cuda' -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but this torch build sees no CUDA GPU")
        return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or
    run as a single process when WORLD_SIZE is absent or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    global _joined_a_group
    _joined_a_group = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


_joined_a_group = False  # this process joined a process group of several ranks (init_distributed)


def end_of_worker(code: int) -> int:
    """The exit of a command: a process that joined a process group and has left it again (a torchrun worker whose
    work is done, written and flushed) leaves here, without the interpreter's finalization; any other returns
    `code`. At that finalization, after the last line of Python, something in torch's C++ teardown sometimes
    aborted a gloo worker ("terminate called without an active exception", SIGABRT; about 1 FSDP run in 20 on
    a loaded 2-core machine, after the barrier and destroy_process_group; faulthandler saw no Python frame),
    and torchrun then reported the whole job failed."""
    if not _joined_a_group or (dist.is_available() and dist.is_initialized()):
        return code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def destroy_distributed(wait_for_peers: bool = True) -> None:
    """Leave the process group, by default once every rank is done with it. Without that barrier, a rank
    that finishes first tears down its gloo threads while a peer's last collective is in flight, and aborts
    at exit ("terminate called without an active exception"; seen in 2 of 8 FSDP runs). After an error,
    pass wait_for_peers=False: the peers may never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def leaving_process_group() -> Iterator[None]:
    """Run a command's body, then leave the process group: with the peers when it ends normally, at once
    after an error (the peers may never reach the barrier)."""
    try:
        yield
    except BaseException:
        destroy_distributed(wait_for_peers=False)
        raise
    destroy_distributed()


def barrier() -> None:
    """Wait until every rank gets here (nothing in a single process): after rank 0 writes a file the others read."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so logs read the same at any world size."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python numbers over all ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
