"""Noise schedules for discrete-time diffusion as data: betas and everything derived from them.

Notation follows Ho et al. 2020 (DDPM): ``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` and the forward
process ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)`` (Eq. 4). Karras et al.
2022 (EDM) write the same process as ``x_t / alpha_t = x_0 + sigma_t eps`` with
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; between integer timesteps sigma is
interpolated linearly in log sigma (as diffusers' ``_sigma_to_t``), so grids may hold fractional
timesteps (Karras spacing). Everything is held in float64; tensors handed to networks are cast at
the point of use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def linear_betas(num_steps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas of Ho et al. 2020 (Sec. 4): beta_1 = 1e-4 to beta_T = 0.02."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, *, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, Eq. 17, with betas clipped to ``max_beta``."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def sigmoid_betas(
    num_steps: int, *, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> Tensor:
    """Sigmoid schedule of Chen 2023 ("On the importance of noise scheduling"), Algorithm 1."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar = (-torch.sigmoid((steps * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0.0, max=0.999)


BETA_SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] reshaped to broadcast against ``like`` (B, ...) and cast to its dtype."""
    out = values.to(like.device)[t.to(like.device).long()]
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule; index t runs over 0 .. num_steps - 1."""

    betas: Tensor  # (T,) float64

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or len(self.betas) < 2:
            raise ValueError(
                f"betas must be a 1-D tensor of length >= 2, got {tuple(self.betas.shape)}"
            )
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        object.__setattr__(self, "betas", self.betas.to(torch.float64))

    @classmethod
    def from_name(cls, name: str, num_steps: int) -> NoiseSchedule:
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
        return cls(BETA_SCHEDULES[name](num_steps))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha_bar_t (T,)."""
        return torch.cumprod(1 - self.betas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """alpha_bar_{t-1} with alpha_bar_{-1} = 1 (T,)."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021, Eq. 2)."""
        ab = self.alphas_cumprod
        return ab / (1 - ab)

    @property
    def log_snr(self) -> Tensor:
        return torch.log(self.snr)

    @property
    def posterior_variance(self) -> Tensor:
        """beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (Ho et al., Eq. 7)."""
        return (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod) * self.betas

    @property
    def sigmas(self) -> Tensor:
        """EDM's noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (T,), increasing."""
        ab = self.alphas_cumprod
        return ((1 - ab) / ab).sqrt()

    def sigma_at(self, t: Tensor) -> Tensor:
        """sigma at timesteps t in [0, T - 1], fractional ones linear in log sigma between the
        neighbouring integers (exact at integers); float64, shaped like t."""
        log_sigmas = self.sigmas.log()
        t = t.to(torch.float64)
        if not bool(((t >= 0) & (t <= self.num_steps - 1)).all()):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}], got {t.tolist()}")
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()

    def t_at(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep of noise level ``sigma``, the inverse of :meth:`sigma_at`
        (diffusers' ``_sigma_to_t``); sigmas outside the schedule's range map to 0 or T - 1."""
        log_sigmas = self.sigmas.log()
        log_sigma = sigma.to(torch.float64).log()
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.num_steps - 1)
        lo = hi - 1
        w = ((log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0, 1)
        return lo + w

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """alpha_bar at (possibly fractional) timesteps t: 1 / (1 + sigma_at(t)^2)."""
        if not t.is_floating_point():
            return self.alphas_cumprod[t.long()]
        return 1 / (1 + self.sigma_at(t) ** 2)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), broadcastable against ``like``; a
        floating-point ``t`` may be fractional (:meth:`sigma_at`)."""
        if t.is_floating_point():
            sigma = self.sigma_at(t.cpu())
            alpha = (1 + sigma**2).rsqrt()
            shape = (-1, *([1] * (like.ndim - 1)))
            return (
                alpha.reshape(shape).to(like.device, like.dtype),
                (sigma * alpha).reshape(shape).to(like.device, like.dtype),
            )
        ab = self.alphas_cumprod
        return _gather(ab.sqrt(), t, like), _gather((1 - ab).sqrt(), t, like)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise (Ho et al., Eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al., Eqs. 6-7)."""
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef_x0 = ab_prev.sqrt() * self.betas / (1 - ab)
        coef_xt = (1 - self.betas).sqrt() * (1 - ab_prev) / (1 - ab)
        mean = _gather(coef_x0, t, x_t) * x0 + _gather(coef_xt, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t)


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
KARRAS_RHO = 7.0  # Karras et al. 2022, Eq. 5 and Table 1


def karras_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, *, rho: float = KARRAS_RHO
) -> Tensor:
    """EDM's noise levels, Karras et al. 2022 Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i = 0 .. N - 1 (float64, descending)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def karras_grid(schedule: NoiseSchedule, num_steps: int, *, rho: float = KARRAS_RHO) -> Tensor:
    """A descending grid of fractional timesteps whose sigmas are EDM's (Eq. 5), from the
    schedule's largest sigma (t = T - 1) to its smallest (t = 0), as diffusers'
    ``use_karras_sigmas`` on a full-range grid."""
    if not 1 <= num_steps <= schedule.num_steps:
        raise ValueError(f"num_steps must be in [1, {schedule.num_steps}], got {num_steps}")
    sigmas = schedule.sigmas
    grid = schedule.t_at(karras_sigmas(float(sigmas[0]), float(sigmas[-1]), num_steps, rho=rho))
    grid[0] = schedule.num_steps - 1  # exact ends, whatever the rounding of log and exp
    if num_steps > 1:
        grid[-1] = 0
    return grid


SPACINGS = (*TIMESTEP_SPACINGS, "karras")


def sampling_grid(schedule: NoiseSchedule, num_steps: int, *, spacing: str) -> Tensor:
    """The grid a sampler steps over: integer timesteps spaced as :func:`timestep_grid`, or
    fractional ones at Karras sigmas (``spacing="karras"``, :func:`karras_grid`)."""
    if spacing == "karras":
        return karras_grid(schedule, num_steps)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return timestep_grid(schedule.num_steps, num_steps, spacing=spacing)


def timestep_grid(num_train_steps: int, num_steps: int, *, spacing: str = "leading") -> Tensor:
    """A descending grid of ``num_steps`` training timesteps to sample on.

    Spacings as tabulated by Lin et al. 2024 ("Common diffusion noise schedules are flawed",
    Table 2):
    ``leading`` (DDIM), ``trailing`` and ``linspace`` (DPM-Solver).
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    if spacing == "leading":
        ratio = num_train_steps // num_steps
        grid = torch.arange(num_steps) * ratio
    elif spacing == "trailing":
        step = num_train_steps / num_steps
        grid = torch.from_numpy(np.arange(num_train_steps, 0, -step)).round().flip(0) - 1
    elif spacing == "linspace":
        k = torch.arange(num_steps + 1, dtype=torch.float64)
        grid = (k * ((num_train_steps - 1) / num_steps)).round()[1:]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(
            f"{spacing} spacing with {num_steps} of {num_train_steps} steps repeats timesteps; "
            "use fewer steps or leading spacing"
        )
    return grid.long().flip(0)
