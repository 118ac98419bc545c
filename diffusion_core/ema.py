"""Exponential moving average of a network's weights, the weights that sample.

Two profiles. A fixed decay, with the warm-up of Tarvainen & Valpola 2017. Or the power-function
EMA of Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2): after update t (counting from 1) the average weighs the network of update i by
``(1 - beta_i) (i / t)^(gamma + 1)`` with ``beta_i = (1 - 1/i)^(gamma + 1)``, close to ``i^gamma``,
so its length grows with the run. ``sigma_rel``, the standard deviation of that profile as a
fraction of the run's length, names it: ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion_core.config import SIGMA_REL_MAX


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The power-function exponent whose profile has relative width ``sigma_rel``: the positive
    root of ``gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s = 0`` with ``s = sigma_rel^-2``."""
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel} is not in (0, {SIGMA_REL_MAX:.4f})")
    s = sigma_rel**-2
    lo, hi = 0.0, s  # the cubic is < 0 at 0 (12 - s < 0) and > 0 at s
    for _ in range(200):
        mid = (lo + hi) / 2
        if ((mid + 7) * mid + 16 - s) * mid + 12 - s < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sigma_rel_of_gamma(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class EMA:
    """EMA of parameters and buffers in float32: a fixed ``decay`` (with its warm-up), or the
    power-function profile of width ``sigma_rel`` when that is given."""

    def __init__(
        self,
        net: nn.Module,
        *,
        decay: float,
        warmup: bool = True,
        sigma_rel: float | None = None,
    ) -> None:
        self.decay, self.warmup = decay, warmup
        self.gamma = None if sigma_rel is None else gamma_of_sigma_rel(sigma_rel)
        self.shadow = {k: v.detach().float().clone() for k, v in net.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0-based)."""
        if self.gamma is not None:
            return (1 - 1 / (step + 1)) ** (self.gamma + 1)
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
