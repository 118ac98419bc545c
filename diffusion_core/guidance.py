"""Classifier-free guidance: a denoiser that mixes conditional and unconditional predictions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_core.parameterization import Cond, Denoiser


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

    ``interval = (low, high)`` guides only at noise levels low < sigma <= high (EDM's sigma =
    sigma_t / alpha_t), Kynkaanniemi et al. 2024; elsewhere only the conditional half runs.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Cond,
        null_cond: Cond,
        scale: float,
        *,
        interval: tuple[float, float] | None = None,
    ) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        if interval is not None and not 0.0 <= interval[0] < interval[1]:
            raise ValueError(f"guidance interval must be 0 <= low < high, got {interval}")
        unclipped = Denoiser(denoiser.net, denoiser.schedule, denoiser.prediction, clip_x0=False)
        self.scale, self.interval = float(scale), interval
        self.clip_x0, self.schedule = denoiser.clip_x0, denoiser.schedule
        self.cond_denoiser = unclipped.with_cond(cond)
        self.both_denoiser = unclipped.with_cond(concat_cond(cond, null_cond))

    def _guides_at(self, t: Tensor) -> bool:
        if self.interval is None:
            return True
        sigma = float(self.schedule.sigma_at(t[:1].cpu())[0])
        return self.interval[0] < sigma <= self.interval[1]

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if self.scale == 1.0 or not self._guides_at(t):
            x0 = self.cond_denoiser(x_t, t)
        else:
            x0_both = self.both_denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]))  # (2B, ...)
            x0_c, x0_u = x0_both.chunk(2)  # (B, ...) each
            x0 = x0_u + self.scale * (x0_c - x0_u)
        return x0.clamp(-1, 1) if self.clip_x0 else x0
