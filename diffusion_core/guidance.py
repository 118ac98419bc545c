"""Guidance and conditioning wrappers around denoisers and samplers.

- ``ClassifierFreeGuidance``: a denoiser that mixes conditional and unconditional predictions.
- ``inpaint``: RePaint sampling with resampling jumps, filling the unknown region of an image.
- ``load_mask``: reads an inpainting mask image (white = known).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffusion_core.parameterization import Cond, Denoiser, DenoiserFn
from diffusion_core.samplers import (
    DDPM_VARIANCES,
    Callback,
    batch_timesteps,
    ddpm_step,
    grid_alphas_cumprod,
    standard_normal,
)
from diffusion_core.schedules import NoiseSchedule


def _cat_field(name: str, a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if (a is None) != (b is None):
        given = "cond" if a is not None else "null_cond"
        raise ValueError(
            f"cond.{name} and null_cond.{name} must both be set or both be None, "
            f"only {given}.{name} is set"
        )
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        raise ValueError(
            f"cond.{name} and null_cond.{name} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return torch.cat([a, b])


def concat_cond(cond: Cond, null_cond: Cond) -> Cond:
    """``cond`` stacked over ``null_cond`` along the batch: a 2B Cond for one guidance call."""
    return Cond(
        labels=_cat_field("labels", cond.labels, null_cond.labels),
        context=_cat_field("context", cond.context, null_cond.context),
        pooled=_cat_field("pooled", cond.pooled, null_cond.pooled),
    )


class ClassifierFreeGuidance:
    """Classifier-free guidance, Ho & Salimans 2022 Eq. 6 (scale = 1 + w), on x0 predictions.

    ``x0 = x0_u + scale (x0_c - x0_u)``; at fixed x_t, x0 is affine in eps, so this equals guiding
    eps. Conditional and unconditional halves run as one network call on a 2B batch; ``cond`` and
    ``null_cond`` must each carry the batch size B of x_t. With ``scale == 1`` only the
    conditional half runs. If ``denoiser.clip_x0`` is set, the guided x0 is clipped to [-1, 1]
    (the inner predictions are not clipped).
    """

    def __init__(self, denoiser: Denoiser, cond: Cond, null_cond: Cond, scale: float) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        unclipped = Denoiser(denoiser.net, denoiser.schedule, denoiser.prediction, clip_x0=False)
        self.scale = float(scale)
        self.clip_x0 = denoiser.clip_x0
        self.cond_denoiser = unclipped.with_cond(cond)
        self.both_denoiser = unclipped.with_cond(concat_cond(cond, null_cond))

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if self.scale == 1.0:
            x0 = self.cond_denoiser(x_t, t)
        else:
            x0_both = self.both_denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]))  # (2B, ...)
            x0_c, x0_u = x0_both.chunk(2)  # (B, ...) each
            x0 = x0_u + self.scale * (x0_c - x0_u)
        return x0.clamp(-1, 1) if self.clip_x0 else x0


def repaint_schedule(num_steps: int, *, jump_length: int, resample: int) -> list[int]:
    """Grid positions visited by RePaint (Lugmayr et al. 2022, Sec. 4.2, ``get_schedule_jump``).

    Position i stands for ``timesteps[i]`` and position ``num_steps`` for clean data; the list
    starts at 0 and ends at ``num_steps``. A step to a higher position denoises, a step to a
    lower one is a forward jump. Every ``jump_length`` levels the sampler goes back up
    ``jump_length`` levels, ``resample - 1`` times; ``resample == 1`` gives plain 0, 1, ..., n.
    """
    if jump_length < 1:
        raise ValueError(f"jump_length must be >= 1, got {jump_length}")
    if resample < 1:
        raise ValueError(f"resample must be >= 1, got {resample}")
    # RePaint counts levels upwards: level k is position num_steps - 1 - k, level -1 is clean data
    jumps = {j: resample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    level = num_steps
    levels: list[int] = []
    while level >= 1:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    levels.append(-1)
    return [num_steps - 1 - k for k in levels]


def inpaint(
    denoiser: DenoiserFn,
    known: Tensor,
    mask: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator,
    jump_length: int = 10,
    resample: int = 10,
    variance: str = "fixed_small",
    callback: Callback | None = None,
) -> Tensor:
    """RePaint, Lugmayr et al. 2022 Alg. 1, with the jump schedule of ``repaint_schedule``.

    ``mask`` is 1 where pixels are KNOWN and 0 where they are to be filled; it broadcasts against
    ``known`` (B, C, H, W), e.g. (B, 1, H, W) or (1, 1, H, W). After each denoising step the known
    region is replaced by a fresh draw of q(x_t | known) and the unknown region is a DDPM step
    (Ho et al. 2020, Eqs. 6-7); forward jumps draw from q(x_t | x_{t-1}). The start is N(0, I)
    in the unknown region and a draw of q(x_T | known) in the known one. The result equals
    ``known`` exactly on the known region. ``callback`` gets the index of each denoising step.
    """
    if generator is None:
        raise ValueError("inpainting needs a torch.Generator for its noise, got None")
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, known.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to known {tuple(known.shape)}"
        ) from err
    if broadcast != known.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to known {tuple(known.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask values must be 0 (unknown) or 1 (known)")
    is_known = (mask == 1).to(known.device)

    alpha_bars = grid_alphas_cumprod(timesteps, schedule)
    ts = timesteps.tolist()
    n = len(ts)

    def q_known(alpha_bar: float) -> Tensor:
        """A draw of q(x_t | known) (Ho et al., Eq. 4)."""
        noise = standard_normal(known, generator)
        return math.sqrt(alpha_bar) * known + math.sqrt(1.0 - alpha_bar) * noise

    x = torch.where(is_known, q_known(alpha_bars[0]), standard_normal(known, generator))
    positions = repaint_schedule(n, jump_length=jump_length, resample=resample)
    i = 0
    for p, p_next in itertools.pairwise(positions):
        if p_next > p:  # denoise from timesteps[p] to the next grid point (or clean data)
            t_b = batch_timesteps(ts[p], x)
            x0_hat = denoiser(x, t_b)
            if callback is not None:
                callback(i, t_b, x, x0_hat)
            i += 1
            last = p_next == n
            noise = None if last else standard_normal(x, generator)
            x_unknown = ddpm_step(
                x, x0_hat, alpha_bars[p], alpha_bars[p_next], variance=variance, noise=noise
            )
            # at clean data q(x_0 | known) is ``known`` itself, which makes the output exact
            x_known = known if last else q_known(alpha_bars[p_next])
            x = torch.where(is_known, x_known, x_unknown)
        else:  # forward jump: x_{t'} ~ q(x_{t'} | x_t) = N(sqrt(a' / a) x_t, (1 - a' / a) I)
            ratio = alpha_bars[p_next] / alpha_bars[p]
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * standard_normal(x, generator)
    return x


def load_mask(
    path_or_array: str | os.PathLike[str] | np.ndarray, size: int | tuple[int, int]
) -> Tensor:
    """An inpainting mask as a (1, 1, H, W) float tensor of {0, 1}, 1 = known.

    Images (any format PIL reads, converted to grayscale) count a pixel as known where it is white,
    i.e. >= 128. Arrays (H, W) or (H, W, C) count as known where >= 128 for integer dtypes and
    >= 0.5 for float and bool dtypes (channels are averaged). ``size`` is H = W or (H, W); the
    mask is resized with nearest-neighbour interpolation.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {size}")
    if isinstance(path_or_array, np.ndarray):
        array = path_or_array
        if array.ndim == 3:
            array = array.astype(np.float64).mean(axis=-1)
        if array.ndim != 2:
            raise ValueError(f"mask array must be (H, W) or (H, W, C), got {path_or_array.shape}")
        threshold = 128 if np.issubdtype(path_or_array.dtype, np.integer) else 0.5
        image = Image.fromarray(np.where(array >= threshold, 255, 0).astype(np.uint8))
    else:
        path = Path(path_or_array)
        try:
            with Image.open(path) as opened:
                image = opened.convert("L")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read mask image {str(path)!r}: {err}") from err
    image = image.resize((width, height), resample=Image.Resampling.NEAREST)
    known = np.asarray(image) >= 128  # (H, W)
    return torch.from_numpy(known.astype(np.float32))[None, None]  # (1, 1, H, W)
