"""Reading and writing uint8 image tensors (N, C, H, W) as PNG files and grids."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) uint8 to a PIL image (L for one channel, RGB for three)."""
    arr = image.permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def make_grid(images: Tensor, *, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Tensor:
    """Tile (N, C, H, W) uint8 images into one (C, H', W') image, ``nrow`` per row."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / nrow))
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid


def save_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(make_grid(images, nrow=nrow, scale=scale)).save(path)
    return path


def read_image(path: str | Path, *, size: int, channels: int) -> Tensor:
    """One image file as (C, size, size) uint8; ValueError naming the file when unreadable."""
    try:
        with Image.open(path) as img:
            mode = "L" if channels == 1 else "RGB"
            arr = np.asarray(img.convert(mode).resize((size, size), Image.Resampling.BICUBIC))
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (same suffix) that is renamed to ``path`` when the block
    exits without error and removed when it fails: readers see the old file or the new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
