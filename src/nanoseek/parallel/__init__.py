"""Distributed training: process groups (torchrun env), and `parallelize`, the only place that applies
DDP, FSDP2 and torch.compile."""

from nanoseek.parallel.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    init_distributed,
    is_main_process,
    leaving_process_group,
    print0,
    resolve_device,
)
from nanoseek.parallel.parallelize import MODES, LossModule, no_grad_sync, parallelize, unwrap

__all__ = [
    "MODES", "DistInfo", "LossModule", "all_reduce_sum", "barrier", "destroy_distributed", "init_distributed",
    "is_main_process", "leaving_process_group", "no_grad_sync", "parallelize", "print0", "resolve_device", "unwrap",
]  # fmt: skip
