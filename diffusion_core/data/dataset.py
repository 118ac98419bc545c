"""A dataset in memory: uint8 images (N, C, H, W) or volumes (N, C, D, H, W), labels, captions,
a content hash that is its identity, and a seeded train/holdout split."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the file, URL or key at fault."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images (or volumes) in memory with optional labels and captions.

    ``images`` is uint8 (N, C, H, W), or (N, C, D, H, W) for volumes; ``labels`` is int64 (N,)
    or None; ``captions`` has one string per image or is None; ``skipped`` counts what the source
    held that was left out: unreadable files, and captions rows naming no image of the folder.
    """

    images: Tensor
    labels: Tensor | None
    class_names: list[str]
    captions: list[str] | None = None
    source: str = ""
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim not in (4, 5):
            raise DatasetError(
                f"{self.source}: images must be uint8 (N, C, H, W) or volumes (N, C, D, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n = self.images.shape[0]
        if self.labels is not None:
            if self.labels.dtype != torch.long or self.labels.shape != (n,):
                raise DatasetError(
                    f"{self.source}: labels must be int64 ({n},), "
                    f"got {self.labels.dtype} {tuple(self.labels.shape)}"
                )
            if n and (
                int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)
            ):
                raise DatasetError(
                    f"{self.source}: labels must lie in [0, {len(self.class_names)}) "
                    f"(one per class name)"
                )
        if self.captions is not None and len(self.captions) != n:
            raise DatasetError(f"{self.source}: {len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def item_shape(self) -> tuple[int, ...]:
        """One item: (C, H, W), or (C, D, H, W) for volumes."""
        return tuple(self.images.shape[1:])

    def read(self, indices: Tensor) -> Tensor:
        """The items at ``indices`` (uint8), as training reads them."""
        return self.images[indices]

    @property
    def dims(self) -> int:
        """2 for images, 3 for volumes."""
        return int(self.images.ndim - 2)

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> ImageDataset:
        """The images at ``indices`` (in that order), with their labels and captions."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageDataset(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=list(self.class_names),
            captions=None if self.captions is None else [self.captions[i] for i in idx.tolist()],
            source=self.source,
            skipped=self.skipped,
        )

    def to_float(self) -> Tensor:
        """Images as float32 in [-1, 1]."""
        return self.images.to(torch.float32) / 127.5 - 1.0

    def sha256(self) -> str:
        """Content hash over images, labels and class names; the dataset's identity."""
        digest = hashlib.sha256()
        header = {
            "shape": list(self.images.shape),
            "labels": self.labels is not None,
            "class_names": list(self.class_names),
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(self.images.detach().cpu().contiguous().numpy().tobytes())
        if self.labels is not None:
            digest.update(self.labels.detach().cpu().numpy().astype("<i8").tobytes())
        return digest.hexdigest()


# ----------------------------------------------------------------------------- tensor helpers


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of (N, C, H, W) to (N, C, size, size), rounded to uint8."""
    x = images.to(torch.float32)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return x.round().clamp_(0, 255).to(torch.uint8)


def match_channels(images: Tensor, channels: int | None) -> Tensor:
    """Grey <-> RGB conversion of uint8 (N, C, H, W); ``None`` keeps the source's channels."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = (images.to(torch.float32) * weights).sum(dim=1, keepdim=True)
        return grey.round().clamp_(0, 255).to(torch.uint8)
    raise DatasetError(f"cannot convert {have}-channel images to {channels} channels")


def split_dataset(
    ds: ImageDataset, *, holdout_fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """(train, holdout): the holdout is the first round(fraction * N) of a seeded permutation."""
    if not 0.0 < holdout_fraction < 1.0:
        raise DatasetError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    n = len(ds)
    n_holdout = round(holdout_fraction * n)
    if n_holdout == 0 or n_holdout == n:
        raise DatasetError(
            f"{ds.source}: {n} images with holdout_fraction={holdout_fraction} leave an empty "
            f"{'holdout' if n_holdout == 0 else 'training'} split"
        )
    order = np.random.RandomState(seed).permutation(n)
    return ds.subset(order[n_holdout:]), ds.subset(order[:n_holdout])
