"""Training objectives: mean squared error on the prediction target, optionally min-SNR weighted,
at timesteps drawn uniformly or at EDM's log-normal noise levels.

Randomness is drawn by the caller (``draw_noise``) so that a data-parallel run can draw it once for
the whole global batch and every rank takes its share: the result then equals one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_core.config import DiffusionConfig
from diffusion_core.parameterization import Cond, EpsPrediction, Prediction, VPrediction
from diffusion_core.schedules import NoiseSchedule

NetFn = Callable[[Tensor, Tensor, Cond | None], Tensor]


def min_snr_weight(snr: Tensor, prediction: Prediction, gamma: float) -> Tensor:
    """Min-SNR-gamma weight of Hang et al. 2023, Eq. 9, for each prediction target.

    The paper's weight min(SNR, gamma) applies to an x0 loss; an eps loss equals SNR times an x0
    loss and a v loss (SNR + 1) times, so their weights divide by those factors.
    """
    clipped = torch.clamp(snr, max=gamma)
    if isinstance(prediction, EpsPrediction):
        return clipped / snr
    if isinstance(prediction, VPrediction):
        return clipped / (snr + 1)
    return clipped


@dataclass(frozen=True)
class LogNormalSigma:
    """EDM's training noise levels (Karras et al. 2022, Sec. 5 and Table 1): ln sigma ~
    N(mean, std^2), taken as the (fractional) timesteps of ``schedule`` with those sigmas, clamped
    to its range."""

    schedule: NoiseSchedule
    mean: float = -1.2
    std: float = 1.2

    def __call__(self, n: int, *, generator: torch.Generator, device: torch.device) -> Tensor:
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        return self.schedule.t_at((self.mean + self.std * z).exp().cpu()).to(device)


TimestepDensity = Callable[..., Tensor]  # (n, *, generator, device) -> (n,) timesteps


def timestep_density(diffusion: DiffusionConfig, schedule: NoiseSchedule) -> TimestepDensity | None:
    """The ``diffusion.timesteps`` density; None for uniform integer timesteps."""
    if diffusion.timesteps == "lognormal":
        return LogNormalSigma(schedule, diffusion.lognormal_mean, diffusion.lognormal_std)
    return None


def draw_noise(
    shape: torch.Size,
    num_steps: int,
    *,
    generator: torch.Generator,
    device: torch.device,
    density: TimestepDensity | None = None,
) -> tuple[Tensor, Tensor]:
    """Timesteps t (B,), uniform integers unless a ``density`` is given, and standard normal
    noise eps of ``shape`` (B, ...)."""
    if density is None:
        t = torch.randint(0, num_steps, (shape[0],), generator=generator, device=device)
    else:
        t = density(shape[0], generator=generator, device=device)
    eps = torch.randn(shape, generator=generator, device=device)
    return t, eps


class DiffusionLoss:
    """Per-sample MSE on the prediction target at timesteps t (Ho et al. 2020, Eq. 14)."""

    def __init__(
        self, schedule: NoiseSchedule, prediction: Prediction, *, min_snr_gamma: float | None = None
    ) -> None:
        self.schedule, self.prediction, self.min_snr_gamma = schedule, prediction, min_snr_gamma

    def __call__(self, net: NetFn, x0: Tensor, cond: Cond | None, t: Tensor, eps: Tensor) -> Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t, x0)
        x_t = alpha * x0 + sigma * eps
        target = self.prediction.target(x0, eps, alpha, sigma)
        out = net(x_t, t, cond)
        loss = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        if self.min_snr_gamma is not None:
            snr = (alpha / sigma).pow(2).flatten().float()  # (B,) alpha_bar / (1 - alpha_bar)
            loss = loss * min_snr_weight(snr, self.prediction, self.min_snr_gamma)
        return loss
