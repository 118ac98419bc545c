"""Training objectives: mean squared error on the prediction target, optionally min-SNR weighted.

Randomness is drawn by the caller (``draw_noise``) so that a data-parallel run can draw it once for
the whole global batch and every rank takes its share: the result then equals one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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


def draw_noise(
    shape: torch.Size, num_steps: int, *, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Uniform timesteps t (B,) and standard normal noise eps of ``shape`` (B, ...)."""
    t = torch.randint(0, num_steps, (shape[0],), generator=generator, device=device)
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
            snr = self.schedule.snr.to(x0.device)[t].float()
            loss = loss * min_snr_weight(snr, self.prediction, self.min_snr_gamma)
        return loss
