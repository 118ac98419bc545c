"""Samplers as stateless functions over an explicit, descending grid of training timesteps.

Every sampler steps from ``timesteps[i]`` to ``timesteps[i + 1]`` and, after the last grid point,
to clean data (alpha_bar = 1), so the output of the last step is that step's x0 prediction with no
noise added. Samplers only see x0 predictions ``D(x_t, t)``; eps is derived with ``eps_from_x0``.
Schedule quantities are evaluated in float64 and applied as Python scalars, so a sampler runs in
the dtype of ``x`` (float32 by default, float64 works too).

``callback(i, t, x, x0_hat)`` is called once per step with the step index, the (B,) timestep
tensor, the current sample x_t (before the update) and the denoiser's x0 prediction at x_t.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor

from diffusion_core.config import SamplerName
from diffusion_core.parameterization import DenoiserFn, eps_from_x0
from diffusion_core.schedules import NoiseSchedule

Callback = Callable[[int, Tensor, Tensor, Tensor], None]
SamplerFn = Callable[..., Tensor]

DDPM_VARIANCES = ("fixed_small", "fixed_large")


def standard_normal(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator``."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def grid_alphas_cumprod(timesteps: Tensor, schedule: NoiseSchedule) -> list[float]:
    """alpha_bar at every grid point, followed by alpha_bar = 1 for clean data (len(grid) + 1)."""
    if timesteps.ndim != 1 or len(timesteps) == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got {tuple(timesteps.shape)}")
    if timesteps.is_floating_point() or timesteps.is_complex():
        raise ValueError(f"timesteps must be an integer tensor, got dtype {timesteps.dtype}")
    ts = [int(t) for t in timesteps.tolist()]
    outside = [t for t in ts if not 0 <= t < schedule.num_steps]
    if outside:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_steps - 1}], got {outside}")
    unordered = [(a, b) for a, b in itertools.pairwise(ts) if a <= b]
    if unordered:
        raise ValueError(f"timesteps must be strictly descending, got {unordered[0]} in a row")
    alphas_cumprod = schedule.alphas_cumprod
    return [float(alphas_cumprod[t]) for t in ts] + [1.0]


def batch_timesteps(t: int, x: Tensor) -> Tensor:
    """The timestep ``t`` as the (B,) long tensor the denoiser is called with."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddpm_step(
    x_t: Tensor,
    x0_hat: Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    *,
    variance: str,
    noise: Tensor | None,
) -> Tensor:
    """One ancestral step x_t -> x_prev (Ho et al. 2020, Eqs. 6-7, on a sub-grid via beta_t').

    ``beta_t' = 1 - alpha_bar_t / alpha_bar_prev``; ``noise=None`` takes the posterior mean.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")
    beta_t = 1.0 - alpha_bar_t / alpha_bar_prev
    coef_x0 = math.sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar_t)
    coef_xt = math.sqrt(1.0 - beta_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    mu = coef_x0 * x0_hat + coef_xt * x_t
    if noise is None:
        return mu
    beta_tilde = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t
    sigma2 = beta_tilde if variance == "fixed_small" else beta_t
    return mu + math.sqrt(sigma2) * noise


def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator,
    variance: str = "fixed_small",
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2 (Eqs. 6-7), with beta_tilde or beta as variance.

    Noise is drawn from ``generator`` as ``torch.randn(x.shape, dtype=x.dtype)`` once on every step
    but the last, which returns the x0 prediction.
    """
    if generator is None:
        raise ValueError("DDPM sampling needs a torch.Generator for its noise, got None")
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")
    alpha_bars = grid_alphas_cumprod(timesteps, schedule)
    n = len(timesteps)
    for i, t in enumerate(timesteps.tolist()):
        t_b = batch_timesteps(t, x)
        x0_hat = denoiser(x, t_b)
        if callback is not None:
            callback(i, t_b, x, x0_hat)
        noise = standard_normal(x, generator) if i < n - 1 else None
        x = ddpm_step(x, x0_hat, alpha_bars[i], alpha_bars[i + 1], variance=variance, noise=noise)
    return x


def sample_ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM, Song et al. 2021 Eq. 12 with sigma_t(eta) from Eq. 16 (eta=0 deterministic).

    For ``eta > 0`` noise is drawn from ``generator`` once on every step but the last.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if eta > 0 and generator is None:
        raise ValueError(f"DDIM with eta={eta} > 0 needs a torch.Generator for its noise")
    alpha_bars = grid_alphas_cumprod(timesteps, schedule)
    n = len(timesteps)
    for i, t in enumerate(timesteps.tolist()):
        t_b = batch_timesteps(t, x)
        x0_hat = denoiser(x, t_b)
        if callback is not None:
            callback(i, t_b, x, x0_hat)
        alpha_bar_t, alpha_bar_prev = alpha_bars[i], alpha_bars[i + 1]
        eps_hat = eps_from_x0(x, x0_hat, *schedule.alpha_sigma(t_b, x))
        # Eq. 16: sigma_t(eta)^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
        beta_t = 1.0 - alpha_bar_t / alpha_bar_prev
        sigma_eta2 = eta**2 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t
        # Eq. 12: sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t(eta)^2) eps + sigma_t(eta) z
        dir_coef = math.sqrt(max(1.0 - alpha_bar_prev - sigma_eta2, 0.0))
        x = math.sqrt(alpha_bar_prev) * x0_hat + dir_coef * eps_hat
        if eta > 0 and i < n - 1:
            x = x + math.sqrt(sigma_eta2) * standard_normal(x, generator)
    return x


def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++") Alg. 2, in data prediction.

    Midpoint form as diffusers' DPMSolverMultistepScheduler: the first step and the last step (to
    sigma = 0, which returns the x0 prediction) are first order, every other step second order.
    """
    alpha_bars = grid_alphas_cumprod(timesteps, schedule)
    n = len(timesteps)
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i, t in enumerate(timesteps.tolist()):
        t_b = batch_timesteps(t, x)
        x0_hat = denoiser(x, t_b)
        if callback is not None:
            callback(i, t_b, x, x0_hat)
        if i == n - 1:
            # first order to sigma = 0: sigma_next / sigma = 0, alpha_next = 1, e^{-h} = 0
            return x0_hat
        alpha_bar_s, alpha_bar_t = alpha_bars[i], alpha_bars[i + 1]
        alpha_s, sigma_s = math.sqrt(alpha_bar_s), math.sqrt(1.0 - alpha_bar_s)
        alpha_t, sigma_t = math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t)
        lambda_s, lambda_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)
        h = lambda_t - lambda_s
        if x0_prev is None:
            D = x0_hat
        else:
            r = h_prev / h
            D = (1.0 + 1.0 / (2.0 * r)) * x0_hat - (1.0 / (2.0 * r)) * x0_prev
        x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * D
        x0_prev, h_prev = x0_hat, h
    return x


@dataclass(frozen=True)
class SamplerEntry:
    """A sampler and the keyword knobs it takes besides the grid and the callback."""

    fn: SamplerFn
    knobs: tuple[str, ...] = ()


# The names are the config's ``SamplerName`` (checked below): one list of samplers.
SAMPLERS: dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry(sample_ddpm, ("generator", "variance")),
    "ddim": SamplerEntry(sample_ddim, ("eta", "generator")),
    "dpmpp_2m": SamplerEntry(sample_dpmpp_2m),
}
if set(SAMPLERS) != set(get_args(SamplerName)):
    raise ImportError(f"samplers {sorted(SAMPLERS)} differ from config's {get_args(SamplerName)}")


def run_sampler(
    name: str,
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    variance: str = "fixed_small",
    callback: Callback | None = None,
) -> Tensor:
    """Run the sampler ``name``, passing it only the knobs it takes (the others are ignored)."""
    entry = SAMPLERS.get(name)
    if entry is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    knobs = {"generator": generator, "eta": eta, "variance": variance}
    taken = {k: knobs[k] for k in entry.knobs}
    return entry.fn(denoiser, x, timesteps, schedule, callback=callback, **taken)
