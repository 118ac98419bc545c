"""Processes and devices: joining a ``torchrun`` process group, this process's rank, the device
to run on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffusion_core.settings import settings


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by ``torchrun``; True when distributed."""
    if settings().world_size <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", settings().local_rank)
    return torch.device("cpu")
