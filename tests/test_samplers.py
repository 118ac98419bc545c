"""Samplers against an analytic oracle: Gaussian data with the exact denoiser E[x0 | x_t].

For x0 ~ N(mu, Sigma) and x_t = alpha x0 + sigma eps, x_t ~ N(alpha mu, alpha^2 Sigma + sigma^2 I)
and E[x0 | x_t] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x_t - alpha mu). Driven by
this denoiser, a correct sampler started from the exact marginal at its first timestep returns
samples of N(mu, Sigma) up to its discretisation error.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
import torch
from torch import Tensor

from diffusion_core import samplers
from diffusion_core.config import SamplerName
from diffusion_core.samplers import (
    SAMPLERS,
    ddpm_step,
    run_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_unipc,
    sampler_nfe,
)
from diffusion_core.schedules import NoiseSchedule, sampling_grid, timestep_grid

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
MU = torch.tensor([0.5, -1.0, 0.25], dtype=F64)
_L = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.4, 0.5]], dtype=F64)
SIGMA = _L @ _L.T  # [[1, .6, -.3], [.6, 1, .14], [-.3, .14, .5]]: correlated, eigenvalues .2-1.6
DIM = 3
N_SAMPLES = 40_000
NUM_TRAIN = 1000

# Discretisation allowance on covariance entries (max |Cov - Sigma|). These are the exact
# errors of each discretised chain, computed without sampling noise by exact_moments() below
# (see test_exact_moments_within_allowance), rounded up by ~15%: DDPM-1000 fixed_small 0.0086,
# fixed_large 0.0010, DDIM-50 eta=0 0.0691, eta=1 0.1377 (DDIM with eta=1 is DDPM on a 50-step
# grid, whose beta_tilde variance is far too small for coarse steps), DPM-Solver++-20 0.0145.
# The exact means equal mu to 1e-13, so the mean needs no allowance.
CASES: dict[str, tuple[str, int, str, dict[str, Any], float]] = {
    "ddpm1000_small": ("ddpm", 1000, "leading", {"variance": "fixed_small"}, 0.010),
    "ddpm1000_large": ("ddpm", 1000, "leading", {"variance": "fixed_large"}, 0.0012),
    "ddim50_eta0": ("ddim", 50, "leading", {"eta": 0.0}, 0.080),
    "ddim50_eta1": ("ddim", 50, "leading", {"eta": 1.0}, 0.158),
    "dpmpp20": ("dpmpp_2m", 20, "linspace", {}, 0.017),
    # Karras spacing spends most steps at small sigma, where this 3-d Gaussian is easy: its
    # errors at a given step count are larger than linspace's (measured 0.087 against 0.015 for
    # DPM-Solver++-20). Measured: DPM-Solver++-20 Karras 0.0866, Euler-20 Karras 0.2456, Euler
    # ancestral-100 linspace 0.0756, Heun-10 linspace 0.0458, Heun-20 Karras 0.0786, UniPC-20
    # linspace 0.0133.
    "dpmpp20_karras": ("dpmpp_2m", 20, "karras", {}, 0.10),
    "euler20_karras": ("euler", 20, "karras", {}, 0.28),
    "euler_a100": ("euler_ancestral", 100, "linspace", {}, 0.087),
    "heun10": ("heun", 10, "linspace", {}, 0.053),
    "heun20_karras": ("heun", 20, "karras", {}, 0.090),
    "unipc20": ("unipc", 20, "linspace", {}, 0.016),
}


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", NUM_TRAIN)


class GaussianOracle:
    """The exact denoiser E[x0 | x_t] for x0 ~ N(mu, Sigma) over vectors (B, d), in float64."""

    def __init__(self, mu: Tensor, Sigma: Tensor, schedule: NoiseSchedule) -> None:
        self.mu, self.Sigma, self.schedule = mu, Sigma, schedule

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x_t.shape[0],) and t.dtype in (torch.long, torch.float64)
        assert bool((t == t[0]).all()), "samplers call the denoiser with one timestep per batch"
        alpha_bar = self.schedule.alpha_bar_at(t[:1])[0]
        alpha = alpha_bar.sqrt()
        cov_t = alpha_bar * self.Sigma + (1 - alpha_bar) * torch.eye(len(self.mu), dtype=F64)
        gain = alpha * self.Sigma @ torch.linalg.inv(cov_t)  # (d, d)
        return self.mu + (x_t - alpha * self.mu) @ gain.T


def marginal(schedule: NoiseSchedule, t: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of x_t (t may be fractional)."""
    alpha_bar = schedule.alpha_bar_at(torch.tensor([t]))[0]
    return alpha_bar.sqrt() * MU, alpha_bar * SIGMA + (1 - alpha_bar) * torch.eye(DIM, dtype=F64)


def sample_marginal(
    schedule: NoiseSchedule, t: float, n: int, generator: torch.Generator
) -> Tensor:
    mean, cov = marginal(schedule, t)
    z = torch.randn(n, DIM, generator=generator, dtype=F64)
    return mean + z @ torch.linalg.cholesky(cov).T


def run_case(case: str, schedule: NoiseSchedule, x: Tensor, generator: torch.Generator) -> Tensor:
    name, num_steps, spacing, knobs, _ = CASES[case]
    timesteps = sampling_grid(schedule, num_steps, spacing=spacing)
    oracle = GaussianOracle(MU, SIGMA, schedule)
    return run_sampler(name, oracle, x, timesteps, schedule, generator=generator, **knobs)


def moment_errors(samples: Tensor, cov_allowance: float) -> tuple[Tensor, Tensor]:
    """|mean - mu| and |cov - Sigma| in units of their tolerance (<= 1 passes).

    Tolerance: 5 standard errors of the sample mean, sqrt(Sigma_ii / N), and of the sample
    covariance, sqrt((Sigma_ij^2 + Sigma_ii Sigma_jj) / N) for Gaussian data; 5 SE leaves a
    two-sided false-alarm rate of ~6e-7 per entry (runs are seeded anyway), and at N = 40k is
    0.025 on the mean and 0.035 on a unit variance. Covariance gets ``cov_allowance`` on top.
    """
    n = samples.shape[0]
    diag = SIGMA.diagonal()
    se_mean = (diag / n).sqrt()
    se_cov = ((SIGMA**2 + torch.outer(diag, diag)) / n).sqrt()
    mean_err = (samples.mean(0) - MU).abs() / (5 * se_mean)
    cov_err = (torch.cov(samples.T) - SIGMA).abs() / (5 * se_cov + cov_allowance)
    return mean_err, cov_err


@pytest.mark.parametrize("case", list(CASES))
def test_samples_reproduce_gaussian(schedule, case):
    _, num_steps, spacing, _, allowance = CASES[case]
    t_first = sampling_grid(schedule, num_steps, spacing=spacing)[0].item()
    g = torch.Generator().manual_seed(2024)
    x = sample_marginal(schedule, t_first, N_SAMPLES, g)
    out = run_case(case, schedule, x, g)
    assert out.dtype == F64 and out.shape == (N_SAMPLES, DIM)
    mean_err, cov_err = moment_errors(out, allowance)
    assert mean_err.max() <= 1, f"mean off by {mean_err.max():.2f} x tolerance"
    assert cov_err.max() <= 1, f"covariance off by {cov_err.max():.2f} x tolerance"


def test_oracle_catches_ddpm_without_noise(schedule, monkeypatch):
    """The same check fails for a DDPM sampler whose noise is always zero."""
    monkeypatch.setattr(samplers, "standard_normal", lambda x, generator: torch.zeros_like(x))
    g = torch.Generator().manual_seed(2024)
    x = sample_marginal(schedule, NUM_TRAIN - 1, N_SAMPLES, g)
    out = run_case("ddpm1000_small", schedule, x, g)
    _, cov_err = moment_errors(out, CASES["ddpm1000_small"][4])
    assert cov_err.max() > 1


def exact_moments(
    case: str,
    schedule: NoiseSchedule,
    monkeypatch: pytest.MonkeyPatch,
    num_steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact output mean and covariance of a sampler run, without sampling noise.

    With the Gaussian oracle every step is affine in x and in that step's noise, so the output is
    out = M x_T + c + sum_k J_k z_k. Running the real sampler once with zero noise tensors that
    require grad gives c, and autograd gives M and every J_k; then for x_T ~ N(m, C) and
    independent z_k ~ N(0, I): mean = M m + c, cov = M C M^T + sum_k J_k J_k^T.
    """
    name, default_steps, spacing, knobs, _ = CASES[case]
    timesteps = sampling_grid(schedule, num_steps or default_steps, spacing=spacing)
    noises: list[Tensor] = []

    def zero_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
        z = torch.zeros_like(x, requires_grad=True)
        noises.append(z)
        return z

    monkeypatch.setattr(samplers, "standard_normal", zero_noise)
    x_T = torch.zeros(1, DIM, dtype=F64, requires_grad=True)
    oracle = GaussianOracle(MU, SIGMA, schedule)
    g = torch.Generator()
    out = run_sampler(name, oracle, x_T, timesteps, schedule, generator=g, **knobs)[0]  # (d,)
    inputs = [x_T, *noises]
    raw = [
        torch.autograd.grad(out[j], inputs, retain_graph=True, allow_unused=True)
        for j in range(DIM)
    ]  # an input the output does not depend on has gradient None
    rows = [
        [torch.zeros_like(v) if d is None else d for d, v in zip(r, inputs, strict=True)]
        for r in raw
    ]
    M = torch.stack([r[0][0] for r in rows])  # (d, d)
    J = [torch.stack([r[k][0] for r in rows]) for k in range(1, len(inputs))]  # K x (d, d)
    m_in, C_in = marginal(schedule, timesteps[0].item())
    mean = M @ m_in + out.detach()
    cov = M @ C_in @ M.T + sum((Jk @ Jk.T for Jk in J), torch.zeros(DIM, DIM, dtype=F64))
    return mean, cov


@pytest.mark.parametrize("case", list(CASES))
def test_exact_moments_within_allowance(schedule, monkeypatch, case):
    mean, cov = exact_moments(case, schedule, monkeypatch)
    assert (mean - MU).abs().max() < 1e-10
    assert (cov - SIGMA).abs().max() <= CASES[case][4]


@pytest.mark.parametrize(
    ("case", "ratio"),
    [
        ("ddim50_eta0", 3.0),
        ("dpmpp20", 4.0),
        ("dpmpp20_karras", 12.0),
        ("euler20_karras", 3.0),
        ("euler_a100", 3.0),
        ("heun20_karras", 12.0),
        ("unipc20", 12.0),
    ],
)
def test_exact_moments_converge(schedule, monkeypatch, case, ratio):
    """Four times the steps cut the covariance error by >= 3x for first-order methods (DDIM
    measured 3.9x, Euler 3.7x, Euler ancestral 3.5x), and by more for second-order ones
    (DPM-Solver++(2M) 6.5x on linspace and 21x on Karras sigmas, Heun 20x, UniPC 24x; 16x is
    the asymptotic rate); a wrong coefficient would not converge."""
    n = CASES[case][1]
    _, cov = exact_moments(case, schedule, monkeypatch)
    _, cov_fine = exact_moments(case, schedule, monkeypatch, num_steps=4 * n)
    err, err_fine = (cov - SIGMA).abs().max(), (cov_fine - SIGMA).abs().max()
    assert err_fine * ratio < err


def test_exact_moments_catch_ddpm_without_noise(schedule, monkeypatch):
    """Zero noise shows up in the exact covariance too (it is the J_k terms that vanish)."""
    _, cov = exact_moments("ddpm1000_small", schedule, monkeypatch)
    assert (cov - SIGMA).abs().max() <= CASES["ddpm1000_small"][4]
    monkeypatch.setattr(samplers, "ddpm_step", _ddpm_step_without_noise)
    _, cov_broken = exact_moments("ddpm1000_small", schedule, monkeypatch)
    assert (cov_broken - SIGMA).abs().max() > 0.3


def _ddpm_step_without_noise(x_t, x0_hat, alpha_bar_t, alpha_bar_prev, *, variance, noise):
    return ddpm_step(x_t, x0_hat, alpha_bar_t, alpha_bar_prev, variance=variance, noise=None)


# --- every step, exactly: recorded noise against the closed-form update -------------------------


def affine_denoiser(x: Tensor, t: Tensor) -> Tensor:
    return 0.5 * x + 0.1 + 1e-3 * t.to(x.dtype)[:, None]


def record_noise(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    drawn: list[Tensor] = []
    real = samplers.standard_normal

    def recording(x: Tensor, generator: torch.Generator | None) -> Tensor:
        z = real(x, generator)
        drawn.append(z)
        return z

    monkeypatch.setattr(samplers, "standard_normal", recording)
    return drawn


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_every_step_closed_form(schedule, monkeypatch, variance, spacing):
    """x_prev = mu_tilde(x_t, x0_hat) + sqrt(var) z on every step but the last, which returns
    x0_hat; mu_tilde from Ho et al. Eq. 7 with beta_t' = 1 - a_t / a_prev, var = beta_tilde_t'
    or beta_t'. Catches zero noise, noise on the last step, and a variance from the wrong step."""
    timesteps = timestep_grid(NUM_TRAIN, 10, spacing=spacing)
    drawn = record_noise(monkeypatch)
    seen: list[tuple[Tensor, Tensor]] = []
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = sample_ddpm(
        affine_denoiser,
        x,
        timesteps,
        schedule,
        generator=torch.Generator().manual_seed(1),
        variance=variance,
        callback=lambda i, t, x_t, x0: seen.append((x_t, x0)),
    )
    n = len(timesteps)
    assert len(drawn) == n - 1 and len(seen) == n
    ab = schedule.alphas_cumprod.tolist()
    ab_grid = [ab[t] for t in timesteps.tolist()] + [1.0]
    xs = [x_t for x_t, _ in seen] + [out]
    for i in range(n):
        a_t, a_prev = ab_grid[i], ab_grid[i + 1]
        beta = 1 - a_t / a_prev
        mean = (
            math.sqrt(a_prev) * beta / (1 - a_t) * seen[i][1]
            + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * seen[i][0]
        )
        if i == n - 1:
            assert torch.equal(xs[i + 1], seen[i][1])
            continue
        var = (1 - a_prev) / (1 - a_t) * beta if variance == "fixed_small" else beta
        assert var > 1e-6  # the noise term is far above the 1e-12 tolerance
        torch.testing.assert_close(xs[i + 1], mean + math.sqrt(var) * drawn[i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_every_step_closed_form(schedule, monkeypatch, eta):
    """Song et al. Eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z."""
    timesteps = timestep_grid(NUM_TRAIN, 10, spacing="trailing")
    drawn = record_noise(monkeypatch)
    seen: list[tuple[Tensor, Tensor]] = []
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = sample_ddim(
        affine_denoiser,
        x,
        timesteps,
        schedule,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        callback=lambda i, t, x_t, x0: seen.append((x_t, x0)),
    )
    n = len(timesteps)
    assert len(drawn) == n - 1
    ab = schedule.alphas_cumprod.tolist()
    ab_grid = [ab[t] for t in timesteps.tolist()] + [1.0]
    xs = [x_t for x_t, _ in seen] + [out]
    for i in range(n - 1):
        a_t, a_prev = ab_grid[i], ab_grid[i + 1]
        x_t, x0 = seen[i]
        eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        s = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - s**2) * eps + s * drawn[i]
        torch.testing.assert_close(xs[i + 1], expected, rtol=0, atol=1e-12)
    assert torch.equal(out, seen[-1][1])


def test_ddim_eta1_is_ddpm_fixed_small(schedule):
    """With eta = 1 DDIM is the DDPM ancestral sampler (Song et al., Sec. 4.1)."""
    timesteps = timestep_grid(NUM_TRAIN, 20)
    oracle = GaussianOracle(MU, SIGMA, schedule)
    x = sample_marginal(schedule, int(timesteps[0]), 256, torch.Generator().manual_seed(0))
    a = sample_ddim(
        oracle, x, timesteps, schedule, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    b = sample_ddpm(oracle, x, timesteps, schedule, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", ["leading", "karras"])
def test_euler_is_ddim(schedule, spacing):
    """Euler's method on the probability-flow ODE in x / alpha and sigma is DDIM with eta = 0
    (Karras et al. 2022, Sec. 4 and App. B.1), step for step on any grid."""
    timesteps = sampling_grid(schedule, 12, spacing=spacing)
    oracle = GaussianOracle(MU, SIGMA, schedule)
    x = sample_marginal(schedule, timesteps[0].item(), 64, torch.Generator().manual_seed(0))
    ours: list[Tensor] = []
    ddim: list[Tensor] = []
    out = sample_euler(oracle, x, timesteps, schedule, callback=lambda *a: ours.append(a[2]))
    ref = sample_ddim(oracle, x, timesteps, schedule, callback=lambda *a: ddim.append(a[2]))
    for a, b in zip([*ours, out], [*ddim, ref], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", ["leading", "karras"])
def test_euler_ancestral_is_ddpm(schedule, spacing):
    """Euler ancestral's split sigma_next^2 = sigma_down^2 + sigma_up^2 is DDPM's ancestral step
    with the posterior variance beta_tilde, noise for noise: the same generator gives the same
    samples on any grid."""
    timesteps = sampling_grid(schedule, 12, spacing=spacing)
    oracle = GaussianOracle(MU, SIGMA, schedule)
    x = sample_marginal(schedule, timesteps[0].item(), 64, torch.Generator().manual_seed(0))
    a = sample_euler_ancestral(
        oracle, x, timesteps, schedule, generator=torch.Generator().manual_seed(3)
    )
    b = sample_ddpm(oracle, x, timesteps, schedule, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    c = sample_euler_ancestral(
        oracle, x, timesteps, schedule, generator=torch.Generator().manual_seed(4)
    )
    assert (c - b).abs().max() > 1e-2  # and the noise matters


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_counts_network_calls(schedule, name):
    """``sampler_nfe`` is the number of denoiser calls: one per step, Heun's 2N - 1."""
    calls = [0]

    def counting(x_t: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        return 0.5 * x_t

    timesteps = sampling_grid(schedule, 7, spacing="karras")
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    run_sampler(name, counting, x, timesteps, schedule, generator=torch.Generator(), eta=0.5)
    assert calls[0] == sampler_nfe(name, 7) == (13 if name == "heun" else 7)


@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m"])
def test_two_step_multistep_is_ddim(schedule, name):
    """On two steps UniPC and DPM-Solver++(2M) are first order throughout: DDIM with eta = 0."""
    timesteps = timestep_grid(NUM_TRAIN, 2, spacing="linspace")
    oracle = GaussianOracle(MU, SIGMA, schedule)
    x = sample_marginal(schedule, int(timesteps[0]), 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        run_sampler(name, oracle, x, timesteps, schedule),
        sample_ddim(oracle, x, timesteps, schedule),
        rtol=0,
        atol=1e-12,
    )


def test_two_step_dpmpp_is_ddim(schedule):
    """On two steps DPM-Solver++(2M) is first order throughout, i.e. DDIM with eta = 0."""
    timesteps = timestep_grid(NUM_TRAIN, 2, spacing="linspace")
    oracle = GaussianOracle(MU, SIGMA, schedule)
    x = sample_marginal(schedule, int(timesteps[0]), 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        sample_dpmpp_2m(oracle, x, timesteps, schedule),
        sample_ddim(oracle, x, timesteps, schedule),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_single_step_returns_x0_prediction(schedule, name):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    timesteps = torch.tensor([500])
    out = run_sampler(name, affine_denoiser, x, timesteps, schedule, generator=torch.Generator())
    assert torch.equal(out, affine_denoiser(x, torch.full((8,), 500)))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_and_float32(schedule, name):
    """Samplers run in the dtype of x (float32 here) and call back once per step."""
    timesteps = timestep_grid(NUM_TRAIN, 5)
    calls: list[tuple[int, Tensor, Tensor, Tensor]] = []
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    out = run_sampler(
        name,
        lambda x_t, t: 0.5 * x_t,
        x,
        timesteps,
        schedule,
        generator=g,
        eta=0.5,
        callback=lambda *args: calls.append(args),
    )
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert [c[0] for c in calls] == list(range(5))
    for (_, t, x_t, x0_hat), t_grid in zip(calls, timesteps.tolist(), strict=True):
        assert t.dtype == torch.long and t.tolist() == [t_grid] * 4
        assert x_t.dtype == x0_hat.dtype == torch.float32


def test_registry_and_unknown_sampler(schedule):
    assert set(SAMPLERS) == set(get_args(SamplerName))
    assert set(SAMPLERS) >= {"ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral", "heun"}
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"'lms'.*'ddim', 'ddpm', 'dpmpp_2m', 'euler'"):
        run_sampler("lms", affine_denoiser, x, torch.tensor([1, 0]), schedule)


def identity_denoiser(x: Tensor, t: Tensor) -> Tensor:
    return x


GEN = torch.Generator()


@pytest.mark.parametrize(
    ("fn", "grid", "knobs", "message"),
    [
        (sample_ddpm, [5, 9], {"generator": GEN}, "descending"),
        (sample_ddim, [5, 5], {}, "descending"),
        (sample_ddim, [1000, 5], {}, r"\[0, 999\].*\[1000\]"),
        (sample_dpmpp_2m, [-1], {}, r"\[0, 999\]"),
        (sample_ddim, [5.0, float("nan")], {}, r"\[0, 999\].*nan"),
        (sample_heun, [999.5], {}, r"\[0, 999\]"),
        (sample_unipc, [3, 3], {}, "descending"),
        (sample_euler_ancestral, [9, 5], {"generator": None}, "Generator"),
        (sample_ddim, [], {}, "non-empty"),
        (sample_ddim, [9, 5], {"eta": 1.5}, "eta"),
        (sample_ddim, [9, 5], {"eta": 0.5}, "Generator"),
        (sample_ddpm, [9, 5], {"generator": GEN, "variance": "learned"}, "'learned'.*fixed_small"),
        (sample_ddpm, [9, 5], {"generator": None}, "Generator"),
    ],
)
def test_bad_input_raises(schedule, fn, grid, knobs, message):
    timesteps = torch.tensor(
        grid, dtype=torch.float32 if any(isinstance(v, float) for v in grid) else torch.long
    )
    with pytest.raises(ValueError, match=message):
        fn(identity_denoiser, torch.zeros(1, 2), timesteps, schedule, **knobs)


def test_run_sampler_ddpm_needs_generator(schedule):
    with pytest.raises(ValueError, match="Generator"):
        run_sampler("ddpm", identity_denoiser, torch.zeros(1, 2), torch.tensor([9, 5]), schedule)
