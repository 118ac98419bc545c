"""Samplers as stateless functions over an explicit, descending grid of training timesteps.

Every sampler steps from ``timesteps[i]`` to ``timesteps[i + 1]`` and, after the last grid point,
to clean data (alpha_bar = 1), so the output of the last step is that step's x0 prediction with no
noise added. A grid holds integer timesteps, or fractional ones (a float tensor, e.g. at Karras
sigmas: ``schedules.karras_grid``) that the denoiser receives as they are. Samplers only see x0
predictions ``D(x_t, t)``; eps is derived with ``eps_from_x0``. Every sampler takes and returns
x_t = alpha_t x0 + sigma_t eps; the ones of Karras et al. 2022 (Euler, Euler ancestral, Heun)
step internally in x_t / alpha_t = x0 + sigma eps (EDM's sigma = sigma_t / alpha_t). Schedule
quantities are evaluated in float64 and applied as Python scalars, so a sampler runs in the dtype
of ``x`` (float32 by default, float64 works too).

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
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers or reals, got dtype {timesteps.dtype}")
    ts = timesteps.tolist()
    outside = [t for t in ts if not 0 <= t <= schedule.num_steps - 1]  # NaN too
    if outside:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_steps - 1}], got {outside}")
    unordered = [(a, b) for a, b in itertools.pairwise(ts) if a <= b]
    if unordered:
        raise ValueError(f"timesteps must be strictly descending, got {unordered[0]} in a row")
    return [*schedule.alpha_bar_at(timesteps.cpu()).tolist(), 1.0]


def grid_sigmas(timesteps: Tensor, schedule: NoiseSchedule) -> list[float]:
    """EDM's sigma = sqrt((1 - alpha_bar) / alpha_bar) at every grid point, then 0 (clean data)."""
    return [math.sqrt((1.0 - a) / a) for a in grid_alphas_cumprod(timesteps, schedule)]


def batch_timesteps(t: float, x: Tensor) -> Tensor:
    """The timestep ``t`` as the (B,) tensor the denoiser is called with: long for an integer
    grid point, float64 for a fractional one."""
    dtype = torch.long if isinstance(t, int) else torch.float64
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


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


def _scale(sigma: float) -> float:
    """1 / alpha at EDM's sigma: x_t / alpha_t = x0 + sigma eps."""
    return math.sqrt(1.0 + sigma**2)


def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma in
    x = x_t / alpha_t (Karras et al. 2022, Eq. 3; Alg. 2 without its second-order correction)."""
    sigmas = grid_sigmas(timesteps, schedule)
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t_b = batch_timesteps(t, x)
        x0_hat = denoiser(x, t_b)
        if callback is not None:
            callback(i, t_b, x, x0_hat)
        if sigma_next == 0.0:
            return x0_hat
        x_cur = x * _scale(sigma)
        d_cur = (x_cur - x0_hat) / sigma
        x = (x_cur + (sigma_next - sigma) * d_cur) / _scale(sigma_next)
    return x  # not reached: the last sigma is 0


def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator,
    callback: Callback | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, eta = 1) in x = x_t / alpha_t:
    an Euler step down to sigma_down, then fresh noise of std sigma_up, with sigma_down^2 +
    sigma_up^2 = sigma_next^2 and sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2.
    Noise is drawn from ``generator`` once on every step but the last."""
    if generator is None:
        raise ValueError("Euler ancestral sampling needs a torch.Generator for its noise, got None")
    sigmas = grid_sigmas(timesteps, schedule)
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t_b = batch_timesteps(t, x)
        x0_hat = denoiser(x, t_b)
        if callback is not None:
            callback(i, t_b, x, x0_hat)
        if sigma_next == 0.0:
            return x0_hat
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x_cur = x * _scale(sigma)
        d_cur = (x_cur - x0_hat) / sigma
        x_next = x_cur + (sigma_down - sigma) * d_cur + sigma_up * standard_normal(x, generator)
        x = x_next / _scale(sigma_next)
    return x  # not reached: the last sigma is 0


def sample_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's second-order method in x = x_t / alpha_t, Karras et al. 2022 Alg. 2
    (deterministic, S_churn = 0): an Euler step, then the average of the slopes at both ends,
    except on the last step (to sigma = 0), which is Euler's. 2N - 1 network evaluations on N
    grid points; the callback sees the first evaluation of each step."""
    sigmas = grid_sigmas(timesteps, schedule)
    ts = timesteps.tolist()
    for i, t_cur in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t_b = batch_timesteps(t_cur, x)
        x0_hat = denoiser(x, t_b)
        if callback is not None:
            callback(i, t_b, x, x0_hat)
        if sigma_next == 0.0:
            return x0_hat
        # Euler step.
        x_cur = x * _scale(sigma)
        d_cur = (x_cur - x0_hat) / sigma
        x_next = x_cur + (sigma_next - sigma) * d_cur
        # Apply 2nd order correction.
        x0_next = denoiser(x_next / _scale(sigma_next), batch_timesteps(ts[i + 1], x))
        d_prime = (x_next - x0_next) / sigma_next
        x_next = x_cur + (sigma_next - sigma) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next / _scale(sigma_next)
    return x  # not reached: the last sigma is 0


def _unipc_rhos(h: float, r: float) -> tuple[float, float]:
    """UniC-2's weights for B(h) = e^h - 1 (Zhao et al. 2023, Alg. 2 with "bh2"): the solution of
    [[1, 1], [r, 1]] rho = (phi_2(h) / B(h), 2 phi_3(h) / B(h)) in data prediction (hh = -h)."""
    hh = -h
    b_h = math.expm1(hh)
    phi_k = math.expm1(hh) / hh - 1.0
    b1 = phi_k / b_h
    phi_k = phi_k / hh - 0.5
    b2 = 2.0 * phi_k / b_h
    rho_0 = (b1 - b2) / (1.0 - r)
    return rho_0, b1 - rho_0


def sample_unipc(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC, Zhao et al. 2023: the UniP-2 predictor and the UniC corrector with B(h) = e^h - 1
    ("bh2"), in data prediction, as diffusers' UniPCMultistepScheduler (order 2, lower order on
    the first and last steps). The corrector reuses the network evaluation at the new point, so
    it costs no extra NFE; the last step (to sigma = 0) returns the x0 prediction."""
    alpha_bars = grid_alphas_cumprod(timesteps, schedule)
    alphas = [math.sqrt(a) for a in alpha_bars]
    sigmas = [math.sqrt(1.0 - a) for a in alpha_bars]
    lambdas = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas, strict=True)]
    n = len(timesteps)
    m: list[Tensor] = []  # x0 predictions at the grid points so far
    x_last = x
    order_last = 1
    for i, t in enumerate(timesteps.tolist()):
        t_b = batch_timesteps(t, x)
        x0_hat = denoiser(x, t_b)
        if callback is not None:
            callback(i, t_b, x, x0_hat)
        if i == n - 1:
            return x0_hat  # first order to sigma = 0 (alpha = 1): the x0 prediction
        m.append(x0_hat)
        if i > 0:
            # UniC: correct x_i with the evaluation at x_i (order of the predictor that made it).
            h = lambdas[i] - lambdas[i - 1]
            x_pred = (sigmas[i] / sigmas[i - 1]) * x_last - alphas[i] * math.expm1(-h) * m[-2]
            b_h = math.expm1(-h)
            if order_last == 1:
                corr = 0.5 * (m[-1] - m[-2])
            else:
                r = (lambdas[i - 2] - lambdas[i - 1]) / h
                rho_0, rho_1 = _unipc_rhos(h, r)
                corr = rho_0 * (m[-3] - m[-2]) / r + rho_1 * (m[-1] - m[-2])
            x = x_pred - alphas[i] * b_h * corr
        # UniP: predict x_{i+1}, first order on the first step (the last one returned above).
        order = 1 if i == 0 else 2
        h = lambdas[i + 1] - lambdas[i]
        x_last, order_last = x, order
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * math.expm1(-h) * m[-1]
        if order == 2:
            r = (lambdas[i - 1] - lambdas[i]) / h
            x = x - alphas[i + 1] * math.expm1(-h) * 0.5 * (m[-2] - m[-1]) / r
    return x  # not reached: the last step returns


@dataclass(frozen=True)
class SamplerEntry:
    """A sampler, the keyword knobs it takes besides the grid and the callback, and its network
    evaluations per grid point (Heun: 2, but the last step is Euler's)."""

    fn: SamplerFn
    knobs: tuple[str, ...] = ()
    evals_per_step: int = 1

    def nfe(self, steps: int) -> int:
        """Network evaluations per sample on a grid of ``steps`` points."""
        return self.evals_per_step * steps - (self.evals_per_step - 1)


# The names are the config's ``SamplerName`` (checked below): one list of samplers.
SAMPLERS: dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry(sample_ddpm, ("generator", "variance")),
    "ddim": SamplerEntry(sample_ddim, ("eta", "generator")),
    "dpmpp_2m": SamplerEntry(sample_dpmpp_2m),
    "euler": SamplerEntry(sample_euler),
    "euler_ancestral": SamplerEntry(sample_euler_ancestral, ("generator",)),
    "heun": SamplerEntry(sample_heun, evals_per_step=2),
    "unipc": SamplerEntry(sample_unipc),
}
if set(SAMPLERS) != set(get_args(SamplerName)):
    raise ImportError(f"samplers {sorted(SAMPLERS)} differ from config's {get_args(SamplerName)}")


def sampler_nfe(name: str, steps: int) -> int:
    """Network evaluations per sample of sampler ``name`` on ``steps`` grid points."""
    entry = SAMPLERS.get(name)
    if entry is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return entry.nfe(steps)


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
