"""Process-group set-up for torchrun (DDP) and DeepSpeed: gloo on CPU, nccl on CUDA.

Single-process runs need no launcher: without ``WORLD_SIZE`` in the environment nothing is
initialised and every helper below degrades to the one-process answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(*, use_deepspeed: bool = False) -> DistInfo:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend if cuda else "gloo")
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def share_from_main(produce: Callable[[], Any]) -> Any:
    """``produce()`` run on rank 0 only, its JSON-able result broadcast to every rank.

    The value travels as UTF-8 JSON in a byte tensor (never pickled). One process: ``produce()``.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return produce()
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    device = device or torch.device("cpu")
    data = json.dumps(produce()).encode("utf-8") if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(buffer.cpu().numpy().tobytes().decode("utf-8"))


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_sums(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sums over all ranks, in float64 (the values themselves in one process)."""
    if not _initialized():
        return [float(value) for value in values]
    if device is None:  # NCCL reduces CUDA tensors only
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(value) for value in tensor.tolist()]


def cleanup_distributed() -> None:
    if _initialized():
        dist.destroy_process_group()
