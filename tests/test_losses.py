"""Prediction targets, their inverse adapters and the min-SNR weights, against closed forms."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.config import ConfigError, parse_config
from diffusion_core.losses import DiffusionLoss, LogNormalSigma, draw_noise, min_snr_weight
from diffusion_core.parameterization import PREDICTIONS, Cond, EDMPrediction
from diffusion_core.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_name("cosine", 1000)


def coefficients(t: torch.Tensor, like: torch.Tensor):
    return SCHEDULE.alpha_sigma(t, like)


@pytest.mark.parametrize("name", ["eps", "v", "x0", "edm"])
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


def test_edm_target_and_weighting_closed_form():
    """Karras et al. 2022 Table 1 on x = x_t / alpha = x0 + s eps: D = c_skip x + c_out F, and MSE
    on F equals lambda(s) ||D - x0||^2 with lambda = (s^2 + sd^2) / (s sd)^2 (Eq. 8)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    alpha, sigma = coefficients(t, x0)
    sd = 0.7
    pred = EDMPrediction(sigma_data=sd)
    s = sigma / alpha
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    x = x0 + s * eps
    torch.testing.assert_close(pred.target(x0, eps, alpha, sigma), (x0 - c_skip * x) / c_out)
    out = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    d = pred.to_x0(out, alpha * x, alpha, sigma)
    torch.testing.assert_close(d, c_skip * x + c_out * out)
    f_loss = (out - pred.target(x0, eps, alpha, sigma)).pow(2)
    weight = (s**2 + sd**2) / (s * sd) ** 2
    torch.testing.assert_close(f_loss, weight * (d - x0).pow(2))


def test_lognormal_timesteps_have_edm_sigmas():
    """ln sigma(t) of the drawn timesteps is N(P_mean, P_std^2) where the schedule's range
    [sigma_0, sigma_999] = [0.01, 157] does not clip it: compared on quantiles inside the range."""
    density = LogNormalSigma(SCHEDULE, mean=-1.2, std=1.2)
    g = torch.Generator().manual_seed(3)
    t, eps = draw_noise(
        torch.Size((200_000, 2)), 1000, generator=g, device=torch.device("cpu"), density=density
    )
    assert t.dtype == torch.float64 and eps.shape == (200_000, 2)
    assert t.min() >= 0 and t.max() <= 999
    log_sigma = SCHEDULE.sigma_at(t).log()
    normal = torch.distributions.Normal(-1.2, 1.2)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        expected = normal.icdf(torch.tensor(q)).item()
        assert abs(log_sigma.quantile(q).item() - expected) < 0.02, q


@pytest.mark.parametrize(
    ("diffusion", "message"),
    [
        ({"prediction": "edm", "min_snr_gamma": 5.0}, "min_snr_gamma does not apply"),
        ({"sigma_data": 0.7}, "sigma_data applies to prediction: edm"),
        ({"lognormal_mean": -1.0}, "lognormal_mean applies to timesteps: lognormal"),
        ({"timesteps": "logit"}, "diffusion.timesteps"),
    ],
)
def test_diffusion_knobs_that_do_not_apply_are_refused(diffusion, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"diffusion": diffusion})
