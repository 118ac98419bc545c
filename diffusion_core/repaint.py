"""RePaint (Lugmayr et al. 2022): inpainting by sampling with known-region replacement and
resampling jumps, over any denoiser and an explicit timestep grid."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from diffusion_core.parameterization import DenoiserFn
from diffusion_core.samplers import (
    DDPM_VARIANCES,
    Callback,
    batch_timesteps,
    ddpm_step,
    grid_alphas_cumprod,
    standard_normal,
)
from diffusion_core.schedules import NoiseSchedule


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
