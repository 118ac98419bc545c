"""Training-time augmentation by the symmetries of the grid (``train.augment``).

* ``flip``: each image (or volume) is mirrored along its last axis (x) with probability 1/2,
  the random horizontal flip of ADM, EDM and diffusers' training scripts.
* ``symmetries``: each item is mapped by a symmetry of the square or cube drawn uniformly: every
  spatial axis is mirrored with probability 1/2 and the axes are permuted at random (the 8
  symmetries of a square, the 48 of a cube).

Either leaves the data's distribution unchanged only when the data has that symmetry (shapes,
textures, microscopy; not digits or text, whose mirror image is another symbol, and not
captions that say left or right): choose it per data set. The draws come from the trainer's
generator, for the whole global batch, so a resumed or multi-process run augments exactly as a
single straight one does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_core.config import Augment


def draw_symmetries(
    kind: Augment, batch: int, spatial: int, *, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor] | None:
    """Per item of the global batch: which spatial axes to mirror, ``(batch, spatial)`` bool, and
    the permutation of the spatial axes, ``(batch, spatial)`` long; None for ``none``."""
    if kind == "none":
        return None
    if kind == "flip":
        last = torch.rand(batch, 1, generator=generator, device=device) < 0.5
        flips = torch.cat(
            [torch.zeros(batch, spatial - 1, dtype=torch.bool, device=device), last], 1
        )
        return flips, torch.arange(spatial, device=device).expand(batch, spatial)
    flips = torch.rand(batch, spatial, generator=generator, device=device) < 0.5
    perms = torch.rand(batch, spatial, generator=generator, device=device).argsort(dim=1)
    return flips, perms


def apply_symmetries(x: Tensor, flips: Tensor, perms: Tensor) -> Tensor:
    """``x`` (B, C, *spatial) with item i mirrored along the axes ``flips[i]`` marks and then
    its spatial axes permuted by ``perms[i]`` (output axis k is input axis ``perms[i, k]``)."""
    spatial = x.dim() - 2
    if flips.shape != (x.shape[0], spatial) or perms.shape != flips.shape:
        raise ValueError(f"symmetries for {tuple(flips.shape)} items, batch is {tuple(x.shape)}")
    if perms.ne(torch.arange(spatial, device=perms.device)).any() and len(set(x.shape[2:])) > 1:
        raise ValueError(f"permuting the axes needs a square grid, got {tuple(x.shape[2:])}")
    out = []
    for item, flip, perm in zip(x, flips.tolist(), perms.tolist(), strict=True):
        axes = [1 + a for a in range(spatial) if flip[a]]
        if axes:
            item = item.flip(axes)
        out.append(item.permute(0, *(1 + p for p in perm)))
    return torch.stack(out).contiguous()
