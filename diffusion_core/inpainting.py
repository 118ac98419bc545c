"""Inpainting inputs and outputs: strict reading of images and masks, batches, atomic writes.

Inpainting promises that the known region of the output is the input, bit for bit. So nothing
here resizes: an image must already have the model's size, a mask the image's size, and a colour
conversion is made only when it loses nothing (grayscale to RGB, or RGB whose three channels are
equal to grayscale). Every error names the file (or the request key) and what was expected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffusion_core.guidance import load_mask
from diffusion_core.images import to_pil

IMAGE_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jpg", ".jpeg")


def _to_model_channels(arr: np.ndarray, channels: int, where: str) -> np.ndarray:
    """(H, W, 3) uint8 to (H, W, channels) without losing information, or ValueError."""
    if channels == 3:
        return arr
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise ValueError(f"{where}: a colour image, but the model takes grayscale (1 channel)")
    return arr[..., :1]


def read_image_exact(path: str | Path, *, size: int, channels: int) -> Tensor:
    """One image file as uint8 (C, size, size); ValueError naming the file when it is unreadable,
    not ``size`` x ``size``, has transparency or colour a grayscale model cannot take."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.size != (size, size):
                raise ValueError(
                    f"{path}: image is {img.size[0]}x{img.size[1]}, the model takes {size}x{size}"
                )
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"{path}: {img.mode} images are not 8-bit; save it as 8-bit")
            rgba = np.asarray(img.convert("RGBA"))  # (H, W, 4)
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None
    if not bool((rgba[..., 3] == 255).all()):
        raise ValueError(f"{path}: image has transparent pixels; inpainting takes opaque images")
    arr = _to_model_channels(rgba[..., :3], channels, str(path))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)


def read_mask_exact(path: str | Path, *, size: int) -> Tensor:
    """A mask file (white = keep) of exactly ``size`` x ``size`` as (1, 1, H, W) of {0, 1}."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: cannot read mask ({exc})") from None
    if (width, height) != (size, size):
        raise ValueError(f"{path}: mask is {width}x{height}, the image is {size}x{size}")
    return load_mask(path, size)


@dataclass(frozen=True)
class Job:
    """One image to complete, its mask and its output file name."""

    image: Path
    mask: Path
    name: str


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden files skipped), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def batch_jobs(image_dir: str | Path, mask: str | Path) -> list[Job]:
    """Pair every image in ``image_dir`` with ``mask`` (one file for all) or with the file of the
    same name in ``mask`` (a folder); outputs are named ``<stem>.png``."""
    image_dir, mask = Path(image_dir), Path(mask)
    images = list_images(image_dir)
    if not images:
        raise ValueError(f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise ValueError(f"{p} and {stems[p.stem]} would both be written as {p.stem}.png")
        stems[p.stem] = p
    if not mask.is_dir():
        if not mask.is_file():
            raise FileNotFoundError(f"{mask}: no such mask file or folder")
        return [Job(p, mask, f"{p.stem}.png") for p in images]
    missing = [p for p in images if not (mask / p.name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: no mask {mask / missing[0].name} "
            f"({len(missing)} of {len(images)} images have no mask of the same name)"
        )
    return [Job(p, mask / p.name, f"{p.stem}.png") for p in images]


def arrays_to_batch(
    image: object, mask: object, *, size: int, channels: int
) -> tuple[Tensor, Tensor]:
    """Request arrays to (known uint8 (N, C, H, W), mask (N or 1, 1, H, W)).

    ``image``: integers in [0, 255], shaped (H, W), (H, W, C) or (N, H, W, C).
    ``mask``: (H, W) for all images or (N, H, W); white (>= 128) or True or >= 0.5 = keep.
    """
    arr = np.asarray(image)
    if arr.dtype.kind not in "ui" or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"'image' must hold integers in [0, 255], got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:3] != (size, size) or arr.shape[3] not in (1, 3):
        raise ValueError(
            f"'image' must be (H, W), (H, W, C) or (N, H, W, C) with H = W = {size} and C in "
            f"(1, 3), got shape {np.asarray(image).shape}"
        )
    arr = arr.astype(np.uint8)
    if arr.shape[3] != channels:
        arr = (
            np.repeat(arr, 3, axis=3)
            if channels == 3
            else np.stack([_to_model_channels(a, 1, "'image'") for a in arr])
        )
    known = torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)  # (N, C, H, W)
    m = np.asarray(mask)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != (size, size) or len(m) not in (1, len(known)):
        raise ValueError(
            f"'mask' must be (H, W) or (N, H, W) matching 'image' {tuple(known.shape)}, "
            f"got shape {np.asarray(mask).shape}"
        )
    masks = torch.cat([load_mask(mi, size) for mi in m])  # (N or 1, 1, H, W)
    return known, masks


def write_pngs(images: Sequence[Tensor], names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Write uint8 (C, H, W) images as ``out_dir/<name>``, all or nothing.

    The files are written into a staging folder beside ``out_dir`` first; a new ``out_dir`` is
    renamed into place in one step, into an existing one each file is renamed over (so a reader
    never sees a partial file, and a failure before the renames leaves nothing behind).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for image, name in zip(images, names, strict=True):
            to_pil(image).save(staging / name, format="PNG")
        if not out_dir.exists():
            os.replace(staging, out_dir)
        else:
            for name in names:
                os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in names]
