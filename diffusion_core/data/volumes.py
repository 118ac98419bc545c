"""Volumes (C, D, H, W): the synthetic shape set, ``.npy`` folders and 2-D views.

A volume dataset is an :class:`~diffusion_core.data.dataset.ImageDataset` whose ``images`` are
uint8 (N, C, D, H, W), so the split, the content hash and the stored manifest are the images' own.
The 2-D views (orthogonal mid-slices, maximum-intensity projections) feed the report and the
image safety detectors.
"""

from __future__ import annotations

import io
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_core.config import DataConfig
from diffusion_core.data.dataset import DatasetError, ImageDataset
from diffusion_core.data.sources import list_folder, read_all, report_skips

VOLUME_SHAPES = ("sphere", "box", "torus")
NPY_EXTENSION = ".npy"
OCCUPIED = 127  # a voxel is occupied when above 0.5 of full scale: uint8 value > 127
_NPY_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError)

# ----------------------------------------------------------------------------- synthetic shapes


@dataclass(frozen=True)
class ShapeParams:
    """One solid in voxel units: ``centre`` (z, y, x); ``sizes`` are the sphere's radius (r,),
    the box's half sides (a_z, a_y, a_x) or the torus's major and minor radii (R, r); a torus
    lies around the axis ``axis`` (0: z, 1: y, 2: x)."""

    shape: str
    centre: tuple[float, float, float]
    sizes: tuple[float, ...]
    axis: int = 0


def shape_mask(params: ShapeParams, side: int) -> np.ndarray:
    """Boolean (side, side, side) mask: voxel centres (index + 0.5) inside the solid."""
    coords = np.arange(side, dtype=np.float64) + 0.5
    grid = np.meshgrid(coords, coords, coords, indexing="ij")  # z, y, x
    d = [g - c for g, c in zip(grid, params.centre, strict=True)]
    if params.shape == "sphere":
        (r,) = params.sizes
        return d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= r**2
    if params.shape == "box":
        return (
            (np.abs(d[0]) <= params.sizes[0])
            & (np.abs(d[1]) <= params.sizes[1])
            & (np.abs(d[2]) <= params.sizes[2])
        )
    if params.shape == "torus":
        major, minor = params.sizes
        along = d[params.axis]
        rho = np.sqrt(sum(d[i] ** 2 for i in range(3) if i != params.axis))
        return (rho - major) ** 2 + along**2 <= minor**2
    raise ValueError(f"unknown shape {params.shape!r} (allowed: {', '.join(VOLUME_SHAPES)})")


def analytic_volume(params: ShapeParams) -> float:
    """The solid's volume in voxels: 4/3 pi r^3, 8 a_z a_y a_x, or 2 pi^2 R r^2 (Pappus)."""
    if params.shape == "sphere":
        return 4.0 / 3.0 * math.pi * params.sizes[0] ** 3
    if params.shape == "box":
        return 8.0 * math.prod(params.sizes)
    if params.shape == "torus":
        major, minor = params.sizes
        return 2.0 * math.pi**2 * major * minor**2
    raise ValueError(f"unknown shape {params.shape!r} (allowed: {', '.join(VOLUME_SHAPES)})")


def _extent(shape: str, sizes: tuple[float, ...], axis: int) -> tuple[float, float, float]:
    """Half extent of the solid along z, y, x."""
    if shape == "sphere":
        return (sizes[0],) * 3
    if shape == "box":
        return (sizes[0], sizes[1], sizes[2])
    major, minor = sizes
    return tuple(minor if i == axis else major + minor for i in range(3))  # type: ignore[return-value]


def draw_shape(rng: np.random.RandomState, shape: str, side: int) -> ShapeParams:
    """A solid of random size (fractions of ``side``) and position, wholly inside the volume."""
    if shape == "sphere":
        sizes: tuple[float, ...] = (rng.uniform(0.15, 0.3) * side,)
    elif shape == "box":
        sizes = tuple(float(s) for s in rng.uniform(0.1, 0.25, size=3) * side)
    else:
        sizes = (rng.uniform(0.18, 0.26) * side, rng.uniform(0.07, 0.11) * side)
    axis = int(rng.randint(3))
    extent = _extent(shape, sizes, axis)
    centre = tuple(float(rng.uniform(e, side - e)) for e in extent)
    return ShapeParams(shape, centre, sizes, axis)  # type: ignore[arg-type]


def synthetic_volumes(cfg: DataConfig) -> ImageDataset:
    """Synthetic, offline: one solid sphere, box or torus (the class) per volume, voxels 255
    inside and 0 outside, of random size and position; deterministic from ``split_seed``."""
    if cfg.channels not in (None, 1):
        raise DatasetError(f"data.channels={cfg.channels}: synthetic volumes have one channel")
    rng = np.random.RandomState(cfg.split_seed)
    n, side = cfg.num_samples, cfg.image_size
    labels = rng.randint(len(VOLUME_SHAPES), size=n)
    volumes = np.zeros((n, 1, side, side, side), dtype=np.uint8)
    for i, label in enumerate(labels):
        volumes[i, 0][shape_mask(draw_shape(rng, VOLUME_SHAPES[label], side), side)] = 255
    return ImageDataset(
        images=torch.from_numpy(volumes),
        labels=torch.as_tensor(labels, dtype=torch.long),
        class_names=list(VOLUME_SHAPES),
        source=f"synthetic volumes (n={n}, side={side}, seed={cfg.split_seed})",
    )


# ----------------------------------------------------------------------------- .npy folders


def _is_npy(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() == NPY_EXTENSION


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is, bool as 0/255, floats in [0, 1] scaled to 0..255, integers in 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise DatasetError(
                f"{where}: float volumes must hold finite values in [0, 1], "
                f"got range [{np.nanmin(array)}, {np.nanmax(array)}]"
            )
        return np.round(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise DatasetError(
                f"{where}: integer volumes must lie in [0, 255], "
                f"got range [{array.min()}, {array.max()}]"
            )
        return array.astype(np.uint8)
    raise DatasetError(f"{where}: unsupported dtype {array.dtype} (uint8, bool, int or float)")


def _volume(array: np.ndarray, where: str, side: int) -> Tensor:
    """A decoded array as uint8 (C, side, side, side): (D, H, W) gets one channel; cubes of
    another side are resampled (trilinear)."""
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or len(set(array.shape[1:])) != 1 or 0 in array.shape:
        raise DatasetError(
            f"{where}: expected a cubic volume (D, H, W) or (C, D, H, W) with D = H = W, "
            f"got shape {array.shape}"
        )
    volume = torch.from_numpy(np.ascontiguousarray(_to_uint8(array, where)))
    if volume.shape[-1] == side:
        return volume
    x = F.interpolate(volume[None].float(), size=(side,) * 3, mode="trilinear", align_corners=False)
    return x[0].round().clamp_(0, 255).to(torch.uint8)


def volume_folder(
    cfg: DataConfig, *, storage_options: dict[str, Any] | None = None
) -> ImageDataset:
    """``.npy`` volumes under ``cfg.root`` (any fsspec URL), one class per sub-folder or flat.

    Files that cannot be read or parsed as ``.npy`` (pickled object arrays included) are skipped
    and counted, like unreadable images; a readable array that is not a cubic volume, or whose
    values or channels do not fit, is an error naming the file.
    """
    url = str(cfg.root)
    fs, _, paths, labels, class_names = list_folder(
        url,
        "volume",
        accept=_is_npy,
        storage_options=storage_options,
        follow_symlinks=cfg.follow_symlinks,
    )

    volumes: list[Tensor] = []
    kept: list[int] = []
    skipped: list[str] = []
    for index, (path, blob) in enumerate(read_all(fs, paths)):
        if isinstance(blob, BaseException):
            skipped.append(path)
            continue
        try:
            array = np.load(io.BytesIO(blob), allow_pickle=False)
        except _NPY_ERRORS:
            skipped.append(path)
            continue
        if not isinstance(array, np.ndarray):  # an .npz archive saved under a .npy name
            skipped.append(path)
            continue
        volumes.append(_volume(array, path, cfg.image_size))
        kept.append(index)
    report_skips(url, skipped)
    if not volumes:
        raise DatasetError(
            f"{url}: no readable volumes (extension {NPY_EXTENSION}; "
            f"{len(skipped)} unreadable file(s) skipped)"
        )
    channels = {int(v.shape[0]) for v in volumes}
    if len(channels) > 1:
        raise DatasetError(f"{url}: volumes with different channel counts {sorted(channels)}")
    if cfg.channels is not None and channels != {cfg.channels}:
        raise DatasetError(
            f"{url}: data.channels={cfg.channels} but the volumes have {channels.pop()} channel(s)"
        )
    return ImageDataset(
        images=torch.stack(volumes),
        labels=torch.tensor([labels[i] for i in kept], dtype=torch.long) if class_names else None,
        class_names=class_names,
        source=url,
        skipped=len(skipped),
    )


# ----------------------------------------------------------------------------- 2-D views


def _check_volumes(volumes: Tensor) -> None:
    if volumes.ndim != 5 or len(set(volumes.shape[2:])) != 1:
        raise ValueError(f"expected cubic volumes (N, C, S, S, S), got {tuple(volumes.shape)}")


def mid_slices(volumes: Tensor) -> Tensor:
    """The three orthogonal slices through the centre, side by side: (N, C, S, S, S) ->
    (N, C, S, 3S) holding the z-, y- and x-slices in that order."""
    _check_volumes(volumes)
    m = volumes.shape[-1] // 2
    return torch.cat([volumes[:, :, m], volumes[:, :, :, m], volumes[:, :, :, :, m]], dim=-1)


def max_projections(volumes: Tensor) -> Tensor:
    """Maximum-intensity projections along z, y and x, side by side: (N, C, S, 3S)."""
    _check_volumes(volumes)
    return torch.cat([volumes.amax(dim=d) for d in (2, 3, 4)], dim=-1)


ReportFigure = tuple[str, Tensor, Tensor | None, str]  # file name, views, labels, caption


def report_views(
    volumes: Tensor, labels: Tensor | None, holdout: ImageDataset
) -> list[ReportFigure]:
    """The report's volume figures: uint8 (N, C, S, 3S) views, one row per class when labelled."""
    return [
        (
            "volume-slices.png",
            mid_slices(volumes),
            labels,
            "Orthogonal mid-slices (z | y | x) of generated volumes.",
        ),
        (
            "volume-mips.png",
            max_projections(volumes),
            labels,
            "Maximum-intensity projections (along z | y | x) of generated volumes.",
        ),
        (
            "holdout-mips.png",
            max_projections(holdout.images),
            holdout.labels,
            "Maximum-intensity projections (along z | y | x) of held-out real volumes.",
        ),
    ]
