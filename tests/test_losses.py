"""Prediction targets, their inverse adapters and the min-SNR weights, against closed forms."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.losses import DiffusionLoss, min_snr_weight
from diffusion_core.parameterization import PREDICTIONS, Cond
from diffusion_core.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_name("cosine", 1000)


def coefficients(t: torch.Tensor, like: torch.Tensor):
    return SCHEDULE.alpha_sigma(t, like)


@pytest.mark.parametrize("name", ["eps", "v", "x0"])
def test_target_round_trips_to_x0(name):
    """A network that outputs the exact target makes the adapter return the exact x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,), generator=g)
    alpha, sigma = coefficients(t, x0)
    x_t = alpha * x0 + sigma * eps
    pred = PREDICTIONS[name]
    target = pred.target(x0, eps, alpha, sigma)
    assert torch.allclose(pred.to_x0(target, x_t, alpha, sigma), x0, atol=1e-9)


def test_v_target_closed_form():
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, Eq. 4) and ||v||^2 = ||eps||^2 at x0 = 0."""
    x0 = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    eps = torch.ones_like(x0)
    t = torch.tensor([0, 250, 500, 999])
    alpha, sigma = coefficients(t, x0)
    v = PREDICTIONS["v"].target(x0, eps, alpha, sigma)
    assert torch.allclose(v, alpha * eps)


def test_min_snr_weights_per_target():
    """Hang et al. 2023: min(SNR, gamma) for x0, divided by SNR for eps, by SNR + 1 for v."""
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0], dtype=torch.float64)
    gamma = 5.0
    clipped = torch.tensor([0.01, 1.0, 5.0, 5.0], dtype=torch.float64)
    assert torch.allclose(min_snr_weight(snr, PREDICTIONS["x0"], gamma), clipped)
    assert torch.allclose(min_snr_weight(snr, PREDICTIONS["eps"], gamma), clipped / snr)
    assert torch.allclose(min_snr_weight(snr, PREDICTIONS["v"], gamma), clipped / (snr + 1))


def test_loss_is_zero_for_the_ideal_network_and_weighted():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 1, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    loss_fn = DiffusionLoss(SCHEDULE, PREDICTIONS["eps"])
    assert torch.equal(loss_fn(lambda x, tt, c: eps, x0, None, t, eps), torch.zeros(8))
    # A network that is off by 1 everywhere has MSE 1; min-SNR scales it per timestep.
    off = DiffusionLoss(SCHEDULE, PREDICTIONS["eps"], min_snr_gamma=5.0)
    loss = off(lambda x, tt, c: eps + 1, x0, Cond(), t, eps)
    snr = SCHEDULE.snr[t].float()
    assert torch.allclose(loss, torch.clamp(snr, max=5.0) / snr, rtol=1e-5)
