"""What training reads, step by step: the global batch of every step as a function of the step
alone (:class:`BatchSchedule`, so a resumed run reads exactly what an uninterrupted one would),
and a ``DataLoader`` of one rank's slice of it, read ahead by worker processes, so a dataset
need not fit in memory."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class TrainData(Protocol):
    """What training reads (``diffusion_core.data.ImageDataset`` in memory, or a dataset that
    reads its items from files as they are needed): items of ``item_shape`` read by index as
    uint8, optional labels and captions, class names, and the content hash that identifies it."""

    @property
    def item_shape(self) -> tuple[int, ...]: ...
    def read(self, indices: Tensor) -> Tensor: ...
    @property
    def labels(self) -> Tensor | None: ...
    @property
    def captions(self) -> list[str] | None: ...
    @property
    def class_names(self) -> list[str]: ...
    @property
    def source(self) -> str: ...
    def __len__(self) -> int: ...
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch of every step: epoch e is a permutation seeded by (seed, e), cut into
    ``size // batch_size`` batches (the ragged end is dropped); step s is batch s % that of epoch
    s // that. A function of the step alone, so any step can be read again, on any rank."""

    size: int
    batch_size: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return self.size // self.batch_size

    def indices(self, step: int) -> Tensor:
        epoch, k = divmod(step, self.per_epoch)
        perm = _permutation(self.size, self.seed * 1_000_003 + epoch)
        return perm[k * self.batch_size : (k + 1) * self.batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(size: int, seed: int) -> Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


class StepImages(torch.utils.data.Dataset[Tensor]):
    """Item s: this rank's uint8 images of step s's global batch (every ``world``-th from
    ``rank``), read from ``data``."""

    def __init__(self, data: TrainData, schedule: BatchSchedule, rank: int, world: int) -> None:
        self.data, self.schedule, self.rank, self.world = data, schedule, rank, world

    def __getitem__(self, step: int) -> Tensor:
        return self.data.read(self.schedule.indices(step)[self.rank :: self.world])


def step_loader(
    data: TrainData, schedule: BatchSchedule, steps: range, *, workers: int, rank: int, world: int
) -> torch.utils.data.DataLoader[Tensor]:
    """This rank's images for ``steps`` in order, read ahead by ``workers`` processes. Its own
    generator seeds the workers, so the global random state (dropout) is the same whether a run
    starts at step 0 or resumes."""
    return torch.utils.data.DataLoader(
        StepImages(data, schedule, rank, world),
        batch_size=None,
        sampler=steps,
        num_workers=workers,
        generator=torch.Generator().manual_seed(schedule.seed),
        persistent_workers=False,
    )
