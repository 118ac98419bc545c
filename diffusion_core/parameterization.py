"""What the network predicts (eps, v or x0), as small adapters rather than branches in samplers.

Every sampler talks to a denoiser ``D(x_t, t) -> x0_hat``; these adapters convert a network's raw
output into that, and give the regression target the loss trains the network towards.
With ``x_t = alpha x0 + sigma eps`` (alpha^2 + sigma^2 = 1):
  eps-prediction (Ho et al. 2020):        x0 = (x_t - sigma eps) / alpha
  v-prediction (Salimans & Ho 2022, Eq. 4): v = alpha eps - sigma x0,  x0 = alpha x_t - sigma v
  x0-prediction:                            the output itself.
  EDM (Karras et al. 2022, Eq. 7):          x0 = c_skip x + c_out F, on x = x_t / alpha.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from diffusion_core.config import DiffusionConfig
from diffusion_core.schedules import NoiseSchedule


class Prediction(Protocol):
    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor: ...

    def to_x0(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor: ...


class EpsPrediction:
    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return eps

    def to_x0(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x_t - sigma * out) / alpha


class VPrediction:
    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha * eps - sigma * x0

    def to_x0(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha * x_t - sigma * out


class X0Prediction:
    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return x0

    def to_x0(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return out


@dataclass(frozen=True)
class EDMPrediction:
    """EDM's preconditioning, Karras et al. 2022 Eq. 7 and Table 1, on x = x_t / alpha =
    x0 + s eps with s = sigma / alpha: D = c_skip x + c_out F, c_skip = sd^2 / (s^2 + sd^2),
    c_out = s sd / sqrt(s^2 + sd^2). The network's target is F = (x0 - c_skip x) / c_out, so plain
    MSE on it is EDM's loss weighting lambda(s) = 1 / c_out^2 on x0 (Eq. 8)."""

    sigma_data: float = 0.5

    def _c_skip_out(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        s, sd = sigma / alpha, self.sigma_data
        norm = (s**2 + sd**2).sqrt()
        return sd**2 / norm**2, s * sd / norm

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out = self._c_skip_out(alpha, sigma)
        return (x0 - c_skip * (x0 + sigma / alpha * eps)) / c_out

    def to_x0(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out = self._c_skip_out(alpha, sigma)
        return c_skip * (x_t / alpha) + c_out * out


PREDICTIONS: dict[str, Prediction] = {
    "eps": EpsPrediction(),
    "v": VPrediction(),
    "x0": X0Prediction(),
    "edm": EDMPrediction(),
}


def prediction_for(diffusion: DiffusionConfig) -> Prediction:
    """The adapter of a ``diffusion:`` section (EDM's with its sigma_data)."""
    if diffusion.prediction == "edm":
        return EDMPrediction(sigma_data=diffusion.sigma_data)
    return PREDICTIONS[diffusion.prediction]


@dataclass(frozen=True)
class Cond:
    """Conditioning handed to a network: class labels and/or text token states."""

    labels: Tensor | None = None  # (B,) long; the null class means "unconditional"
    context: Tensor | None = None  # (B, L, D) text token states for cross-attention
    pooled: Tensor | None = None  # (B, D) pooled text embedding

    def repeat(self, n: int) -> Cond:
        """The same conditioning stacked ``n`` times along the batch (for guidance batches)."""

        def rep(x: Tensor | None) -> Tensor | None:
            return None if x is None else torch.cat([x] * n)

        return Cond(rep(self.labels), rep(self.context), rep(self.pooled))

    def to(self, device: torch.device | str) -> Cond:
        """The same conditioning on ``device``."""

        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return Cond(move(self.labels), move(self.context), move(self.pooled))


# A denoiser maps (x_t, t) to a prediction of x0; t is a (B,) long tensor of training timesteps.
DenoiserFn = Callable[[Tensor, Tensor], Tensor]


class Denoiser:
    """Turns ``net(x_t, t, cond)`` with a given prediction type into ``D(x_t, t) -> x0_hat``."""

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        prediction: Prediction,
        *,
        cond: Cond | None = None,
        clip_x0: bool = False,
    ) -> None:
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.cond, self.clip_x0 = cond, clip_x0

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        out = self.net(x_t, t, self.cond).to(x_t.dtype)
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        x0 = self.prediction.to_x0(out, x_t, alpha, sigma)
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def with_cond(self, cond: Cond | None) -> Denoiser:
        return Denoiser(self.net, self.schedule, self.prediction, cond=cond, clip_x0=self.clip_x0)


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise implied by an x0 prediction: eps = (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma
