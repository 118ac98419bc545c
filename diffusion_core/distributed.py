"""Processes and devices: the device a ``runtime.device`` setting names, the precision of
inference, joining and leaving a ``torchrun`` process group, this process's rank."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from diffusion_core.settings import settings


class DeviceError(ValueError):
    """A device setting this machine cannot honour."""


def local_gpu_index() -> int:
    """Which of this machine's GPUs a process that says ``cuda`` uses: its ``LOCAL_RANK`` under
    torchrun; in a worker of a local Dask cluster (workers named 0..n-1) its name modulo the
    GPU count, so that n workers spread over the GPUs; else 0. Workers that each see one GPU
    (CUDA_VISIBLE_DEVICES set per worker, as dask-cuda does) use that one."""
    local_rank = settings().local_rank
    if local_rank is not None:  # set by torchrun
        return local_rank
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # no Dask, or not in a Dask worker
        return 0
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return name % count if isinstance(name, int) and count else 0


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device ``spec`` names: ``auto`` is this process's GPU (``local_gpu_index``) when CUDA
    is present, else the CPU; ``cuda`` is this process's GPU, ``cuda:N`` that one; a GPU that
    does not exist is a DeviceError."""
    if isinstance(spec, torch.device):
        return spec
    name = spec
    if spec == "auto":
        name = f"cuda:{local_gpu_index()}" if torch.cuda.is_available() else "cpu"
    elif spec == "cuda":  # under torchrun or Dask, each process its own GPU
        name = f"cuda:{local_gpu_index()}"
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceError(
                f"runtime.device={spec!r}, but this machine has {count} CUDA device(s); "
                "use runtime.device: auto or cpu"
            )
    return device


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of sampling and feature extraction: bf16 when asked for, or by
    default on CUDA; None runs in fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` with ``dtype``, or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by ``torchrun`` (NCCL on CUDA, with this process's
    GPU as the current device; gloo on a CPU); True when distributed."""
    if settings().world_size <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def leave_distributed() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrapped(model: object) -> nn.Module:
    """The network inside ``torch.compile`` and DistributedDataParallel wrappers (in either order):
    the module whose parameters, and state-dict keys, the EMA and checkpoints hold."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            break
    assert isinstance(model, nn.Module), f"not a network: {type(model).__name__}"
    return model
