"""Noise schedules and timestep grids against closed forms and diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.schedules import (
    BETA_SCHEDULES,
    NoiseSchedule,
    cosine_betas,
    karras_grid,
    karras_sigmas,
    linear_betas,
    sampling_grid,
    sigmoid_betas,
    timestep_grid,
)

F64 = torch.float64
T = 1000

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_linear_betas_closed_form():
    betas = linear_betas(T)
    assert betas.dtype == F64 and betas.shape == (T,)
    expected = [1e-4 + i * (0.02 - 1e-4) / (T - 1) for i in range(T)]
    torch.testing.assert_close(betas, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    alpha_bar = NoiseSchedule(betas).alphas_cumprod
    for t in (0, 1, 10, 500, T - 1):
        prod = math.prod(1 - b for b in expected[: t + 1])
        assert alpha_bar[t].item() == pytest.approx(prod, rel=1e-12)


def test_cosine_alpha_bar_closed_form():
    """alpha_bar_t = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) pi / 2)^2 (Nichol & Dhariwal,
    Eq. 17), wherever no beta was clipped; betas never exceed 0.999."""
    s = 0.008
    betas = cosine_betas(T)
    assert betas.max() <= 0.999
    clipped = betas >= 0.999
    assert clipped[-1] and clipped.sum() < 5  # only the very last steps hit the cap
    first_clipped = int(clipped.nonzero()[0])

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f((t + 1) / T) / f(0) for t in range(T)], dtype=F64)
    alpha_bar = NoiseSchedule(betas).alphas_cumprod
    torch.testing.assert_close(
        alpha_bar[:first_clipped], expected[:first_clipped], rtol=1e-9, atol=1e-15
    )


@pytest.mark.parametrize(("start", "end", "tau"), [(-3.0, 3.0, 1.0), (0.0, 3.0, 0.7), (-3, 3, 1.1)])
def test_sigmoid_alpha_bar_monotone(start, end, tau):
    betas = sigmoid_betas(T, start=start, end=end, tau=tau)
    assert ((betas > 0) & (betas < 1)).all()
    alpha_bar = NoiseSchedule(betas).alphas_cumprod
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert 0 < alpha_bar[-1] < 1e-2 < 0.99 < alpha_bar[0] < 1


@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
def test_snr_decreasing(name):
    schedule = NoiseSchedule.from_name(name, T)
    snr = schedule.snr
    assert (snr[1:] < snr[:-1]).all()
    torch.testing.assert_close(schedule.log_snr, snr.log())
    ab = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.alphas_cumprod_prev[1:], ab[:-1], rtol=0, atol=0)
    assert schedule.alphas_cumprod_prev[0] == 1


@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
def test_posterior_matches_gaussian_conditioning(name):
    """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0:
    x_{t-1} ~ N(sqrt(a_{t-1}) x_0, 1 - a_{t-1}) and x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) e,
    so Cov(x_{t-1}, x_t) = sqrt(1 - beta_t)(1 - a_{t-1}) and Var(x_t) = 1 - a_t; this must equal
    Ho et al. Eqs. 6-7."""
    schedule = NoiseSchedule.from_name(name, T)
    ab = schedule.alphas_cumprod.tolist()
    betas = schedule.betas.tolist()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 10, 500, 998, T - 1])
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    x_t = torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    mean, var = schedule.q_posterior(x0, x_t, t)
    for b, tb in enumerate(t.tolist()):
        ab_prev = ab[tb - 1] if tb > 0 else 1.0
        cov = math.sqrt(1 - betas[tb]) * (1 - ab_prev)
        gain = cov / (1 - ab[tb])
        exp_mean = math.sqrt(ab_prev) * x0[b] + gain * (x_t[b] - math.sqrt(ab[tb]) * x0[b])
        exp_var = (1 - ab_prev) - cov**2 / (1 - ab[tb])
        torch.testing.assert_close(mean[b], exp_mean, rtol=1e-9, atol=1e-12)
        assert var[b].shape == (1, 1, 1)
        assert var[b].item() == pytest.approx(exp_var, rel=1e-9, abs=1e-15)
        assert schedule.posterior_variance[tb].item() == pytest.approx(exp_var, rel=1e-9, abs=1e-15)


def test_q_sample_moments():
    """Empirical mean and variance of q(x_t | x_0) at N = 200k draws, within 5 standard errors:
    sqrt((1 - a) / N) for the mean and (1 - a) sqrt(2 / N) for the variance (Gaussian)."""
    schedule = NoiseSchedule.from_name("linear", T)
    n, t, x0_value = 200_000, 400, 0.7
    ab = schedule.alphas_cumprod[t].item()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1), x0_value, dtype=F64)
    noise = torch.randn(n, 1, generator=g, dtype=F64)
    x_t = schedule.q_sample(x0, torch.full((n,), t), noise)
    assert abs(x_t.mean().item() - math.sqrt(ab) * x0_value) < 5 * math.sqrt((1 - ab) / n)
    assert abs(x_t.var().item() - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n)


def test_q_sample_per_sample_timesteps_and_dtype():
    schedule = NoiseSchedule.from_name("cosine", T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float32
    for b, tb in enumerate(t.tolist()):
        ab = schedule.alphas_cumprod[tb].item()
        expected = math.sqrt(ab) * x0[b] + math.sqrt(1 - ab) * noise[b]
        torch.testing.assert_close(x_t[b], expected)


# --- timestep grids against diffusers ---------------------------------------------------------

COMMON_STEPS = [1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 999, 1000]
REFERENCES = {"leading": "DDIMScheduler", "trailing": "DDIMScheduler", "linspace": "DPM"}


def diffusers_grid(spacing: str, num_train: int, num_steps: int) -> torch.Tensor:
    diffusers = pytest.importorskip("diffusers")
    if spacing == "linspace":
        scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=num_train)
    else:
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


@pytest.mark.parametrize(
    ("spacing", "num_steps"),
    # linspace over every timestep repeats one: see test_linspace_grid_that_would_repeat_a_timestep
    [(s, n) for s in sorted(REFERENCES) for n in COMMON_STEPS if (s, n) != ("linspace", T)],
)
def test_timestep_grid_matches_diffusers(spacing, num_steps):
    """Leading and trailing as DDIMScheduler, linspace as DPMSolverMultistepScheduler."""
    grid = timestep_grid(T, num_steps, spacing=spacing)
    assert grid.dtype == torch.long and len(grid) == num_steps
    assert torch.equal(grid, diffusers_grid(spacing, T, num_steps))
    assert (grid[1:] < grid[:-1]).all()


def test_linspace_grid_that_would_repeat_a_timestep_is_refused():
    # k * 999/1000 rounds to 500 twice (as in diffusers): refuse rather than sample a repeat.
    with pytest.raises(ValueError, match="repeats timesteps"):
        timestep_grid(T, T, spacing="linspace")


def test_timestep_grid_leading_matches_diffusers_for_every_count():
    for num_train in (1000, 100):
        for n in range(1, num_train + 1):
            assert torch.equal(
                timestep_grid(num_train, n, spacing="leading"),
                diffusers_grid("leading", num_train, n),
            ), n


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_timestep_grid_matches_diffusers_for_every_count(spacing):
    mismatched = []
    for n in range(1, T + 1):
        expected = diffusers_grid(spacing, T, n)
        if len(expected.unique()) < len(expected):  # diffusers repeats a timestep: we refuse
            with pytest.raises(ValueError, match="repeats timesteps"):
                timestep_grid(T, n, spacing=spacing)
        elif not torch.equal(timestep_grid(T, n, spacing=spacing), expected):
            mismatched.append(n)
    assert mismatched == []


@pytest.mark.parametrize(
    ("num_steps", "spacing", "message"),
    [(0, "leading", r"\[1, 1000\]"), (1001, "trailing", r"\[1, 1000\]"), (10, "karras", "karras")],
)
def test_timestep_grid_bad_input(num_steps, spacing, message):
    with pytest.raises(ValueError, match=message):
        timestep_grid(T, num_steps, spacing=spacing)


@pytest.mark.parametrize(
    ("betas", "message"),
    [
        (torch.tensor([0.1]), "length"),
        (torch.full((2, 3), 0.1), "1-D"),
        (torch.tensor([0.0, 0.1]), r"\(0, 1\)"),
        (torch.tensor([0.1, 1.0]), r"\(0, 1\)"),
    ],
)
def test_noise_schedule_bad_betas(betas, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(betas)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match=r"'quadratic'.*cosine"):
        NoiseSchedule.from_name("quadratic", T)


# --- EDM's sigmas and the Karras grid ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
def test_sigma_at_integers_and_between(name):
    """sigma_t = sqrt((1 - a_t) / a_t) at integers; between them linear in log sigma, and t_at
    inverts it; alpha_sigma at a float t equals the table at integers."""
    schedule = NoiseSchedule.from_name(name, T)
    ab = schedule.alphas_cumprod
    t = torch.arange(T)
    torch.testing.assert_close(
        schedule.sigma_at(t.double()), ((1 - ab) / ab).sqrt(), rtol=1e-12, atol=0
    )
    frac = torch.tensor([0.25, 10.5, 499.75, 998.9], dtype=F64)
    lo = frac.floor().long()
    w = frac - lo
    log_s = schedule.sigmas.log()
    expected = ((1 - w) * log_s[lo] + w * log_s[lo + 1]).exp()
    torch.testing.assert_close(schedule.sigma_at(frac), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.t_at(schedule.sigma_at(frac)), frac, rtol=0, atol=1e-9)
    like = torch.zeros(4, 1, 2, 2, dtype=F64)
    ints = torch.tensor([0, 7, 500, 999])
    for got, want in zip(
        schedule.alpha_sigma(ints.double(), like), schedule.alpha_sigma(ints, like), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.sigma_at(torch.tensor([999.5]))


@pytest.mark.parametrize("num_steps", [1, 2, 10, 35, 200])
def test_karras_grid_closed_form(num_steps):
    """The grid's sigmas are Karras et al. 2022 Eq. 5 with rho = 7 from sigma_max = sigma_999 to
    sigma_min = sigma_0, and the grid runs from T - 1 to 0."""
    schedule = NoiseSchedule.from_name("linear", T)
    grid = karras_grid(schedule, num_steps)
    assert grid.dtype == F64 and len(grid) == num_steps and (grid[1:] < grid[:-1]).all()
    smin, smax = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
    i = torch.arange(num_steps, dtype=F64)
    ramp = i / max(num_steps - 1, 1)
    eq5 = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    torch.testing.assert_close(schedule.sigma_at(grid), eq5, rtol=1e-10, atol=0)
    assert grid[0] == T - 1 and (num_steps == 1 or grid[-1] == 0)
    assert torch.equal(sampling_grid(schedule, num_steps, spacing="karras"), grid)


def test_karras_grid_matches_diffusers():
    """diffusers' EulerDiscreteScheduler(use_karras_sigmas=True) over a linspace grid, to its
    float32 rounding."""
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule.from_name("linear", T)
    for n in (5, 10, 25, 50):
        ref = diffusers.EulerDiscreteScheduler(
            num_train_timesteps=T, timestep_spacing="linspace", use_karras_sigmas=True
        )
        ref.set_timesteps(n)
        grid = karras_grid(schedule, n)
        torch.testing.assert_close(ref.timesteps.double(), grid, rtol=0, atol=1e-2)
        torch.testing.assert_close(
            ref.sigmas[:-1].double(), schedule.sigma_at(grid), rtol=2e-4, atol=0
        )


def test_karras_sigmas_and_sampling_grid_bad_input():
    schedule = NoiseSchedule.from_name("linear", T)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(1.0, 0.5, 10)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        karras_grid(schedule, 0)
    with pytest.raises(ValueError, match=r"'uniform'.*karras"):
        sampling_grid(schedule, 10, spacing="uniform")
    assert torch.equal(sampling_grid(schedule, 10, spacing="leading"), timestep_grid(T, 10))
