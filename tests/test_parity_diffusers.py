"""Trajectory parity of our samplers with diffusers' schedulers (test-only dependency).

Both sides are driven by the same deterministic "network" (a fixed random linear map of x plus a
function of t), so every model output depends on the trajectory so far and any difference in an
update compounds. Diffusers keeps its schedule in float32; to compare the algorithms rather than
float32 rounding, the schedulers' alpha_bar tables (and DPM-Solver's sigma table) are replaced by
our float64 schedule, and everything runs in float64. One test also compares against a stock
float32 scheduler.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diffusion_core.parameterization import PREDICTIONS, Denoiser
from diffusion_core.samplers import (
    grid_sigmas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_unipc,
)
from diffusion_core.schedules import NoiseSchedule, sampling_grid, timestep_grid

pytestmark = pytest.mark.usefixtures("single_thread")

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NUM_TRAIN = 1000
SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
# float64 parity tolerance: the two sides evaluate the same update with differently arranged
# arithmetic; measured differences are ~1e-13 after 1000 steps, 1e-9 leaves a wide margin while
# any algorithmic difference (a coefficient, a variance, an order switch) is >= 1e-4.
ATOL64 = 1e-9
# DPM-Solver++: diffusers casts the sample to float32 inside step() even for float64 inputs, so
# each step carries a relative rounding of ~6e-8; measured max difference ~1e-6 over 20 steps.
ATOL_DPM = 2e-5
PARAM_CASES = [("epsilon", "eps"), ("v_prediction", "v")]  # (diffusers name, ours)


class LinearNet:
    """out = 0.8 x + W x + sin(t / 150) b: a deterministic stand-in for a network."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        dim = math.prod(SHAPE[1:])
        self.W = 0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)

    def __call__(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        flat = x.reshape(x.shape[0], -1)  # (B, C*H*W)
        out = 0.8 * flat + flat @ self.W.T + torch.sin(t.to(x.dtype) / 150)[:, None] * self.b
        return out.reshape(x.shape)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", NUM_TRAIN)


def x_T(seed: int = 123) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64)


def ours_trajectory(run, net: LinearNet, schedule: NoiseSchedule, prediction: str) -> list[Tensor]:
    """Every x_t the sampler visits plus its output."""
    denoiser = Denoiser(net, schedule, PREDICTIONS[prediction])  # type: ignore[arg-type]
    xs: list[Tensor] = []
    out = run(denoiser, lambda i, t, x, x0_hat: xs.append(x.clone()))
    return [*xs, out]


def use_float64_alphas(scheduler, schedule: NoiseSchedule) -> None:
    """Replace diffusers' float32 schedule with our float64 one (same betas, more digits)."""
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = 1 - schedule.betas
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    assert len(a) == len(b), f"trajectory lengths differ: {len(a)} vs {len(b)}"
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddpm_matches_diffusers(schedule, dname, ours, variance, num_steps):
    """Noise parity is exact: diffusers' DDPMScheduler.step draws ``torch.randn(shape,
    generator=g, dtype=model_output.dtype)`` once per step with t > 0, and sample_ddpm draws
    ``torch.randn(x.shape, generator=g, dtype=x.dtype)`` once per step but the last. On a
    "leading" grid the last timestep is 0, so two generators with the same seed produce the same
    noise on every step."""
    net = LinearNet()
    timesteps = timestep_grid(NUM_TRAIN, num_steps, spacing="leading")
    ref_sched = diffusers.DDPMScheduler(
        num_train_timesteps=NUM_TRAIN,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type=dname,
        variance_type=variance,
    )
    ref_sched.set_timesteps(num_steps)
    assert torch.equal(ref_sched.timesteps, timesteps)
    use_float64_alphas(ref_sched, schedule)

    g_ref = torch.Generator().manual_seed(7)
    x = x_T()
    ref = [x]
    for t in ref_sched.timesteps:
        x = ref_sched.step(net(x, t), t, x, generator=g_ref).prev_sample
        ref.append(x)

    g_ours = torch.Generator().manual_seed(7)
    traj = ours_trajectory(
        lambda d, cb: sample_ddpm(
            d, x_T(), timesteps, schedule, generator=g_ours, variance=variance, callback=cb
        ),
        net,
        schedule,
        ours,
    )
    assert max_diff(traj, ref) < ATOL64
    # the noise must matter: a different seed moves the result by O(0.1)
    g_other = torch.Generator().manual_seed(8)
    other = sample_ddpm(
        Denoiser(net, schedule, PREDICTIONS[ours]),  # type: ignore[arg-type]
        x_T(),
        timesteps,
        schedule,
        generator=g_other,
        variance=variance,
    )
    assert (other - traj[-1]).abs().max() > 1e-2


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(schedule, dname, ours, eta, spacing):
    """For eta > 0 the noise of every step is drawn up front from a seeded generator and handed
    to DDIMScheduler.step as ``variance_noise``; sample_ddim draws the same stream from a
    generator with the same seed (one ``torch.randn(x.shape, dtype)`` per step but the last)."""
    num_steps = 50
    net = LinearNet(seed=1)
    timesteps = timestep_grid(NUM_TRAIN, num_steps, spacing=spacing)
    ref_sched = diffusers.DDIMScheduler(
        num_train_timesteps=NUM_TRAIN,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type=dname,
        timestep_spacing=spacing,
    )
    ref_sched.set_timesteps(num_steps)
    assert torch.equal(ref_sched.timesteps, timesteps)
    use_float64_alphas(ref_sched, schedule)

    g_noise = torch.Generator().manual_seed(11)
    noises = [
        torch.randn(SHAPE, generator=g_noise, dtype=torch.float64) for _ in range(num_steps - 1)
    ]
    noises.append(torch.zeros(SHAPE, dtype=torch.float64))  # last step: sigma_t(eta) = 0
    x = x_T()
    ref = [x]
    for t, noise in zip(ref_sched.timesteps, noises, strict=True):
        out = ref_sched.step(net(x, t), t, x, eta=eta, variance_noise=noise if eta > 0 else None)
        x = out.prev_sample
        ref.append(x)

    g_ours = torch.Generator().manual_seed(11)
    traj = ours_trajectory(
        lambda d, cb: sample_ddim(
            d, x_T(), timesteps, schedule, eta=eta, generator=g_ours, callback=cb
        ),
        net,
        schedule,
        ours,
    )
    assert max_diff(traj, ref) < ATOL64


def dpm_reference(
    net: LinearNet, schedule: NoiseSchedule, num_steps: int, dname: str, *, float64: bool
) -> list[Tensor]:
    ref_sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN,
        beta_schedule="linear",
        prediction_type=dname,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    ref_sched.set_timesteps(num_steps)
    if float64:
        ab = schedule.alphas_cumprod[ref_sched.timesteps]
        sigmas = ((1 - ab) / ab).sqrt()  # diffusers' sigma = sqrt((1 - alpha_bar) / alpha_bar)
        ref_sched.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    x = x_T()
    ref = [x]
    for t in ref_sched.timesteps:
        x = ref_sched.step(net(x, t), t, x).prev_sample
        ref.append(x)
    return ref


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize("num_steps", [10, 20, 2])
def test_dpmpp_2m_matches_diffusers(schedule, dname, ours, num_steps):
    net = LinearNet(seed=2)
    timesteps = timestep_grid(NUM_TRAIN, num_steps, spacing="linspace")
    ref = dpm_reference(net, schedule, num_steps, dname, float64=True)
    traj = ours_trajectory(
        lambda d, cb: sample_dpmpp_2m(d, x_T(), timesteps, schedule, callback=cb),
        net,
        schedule,
        ours,
    )
    assert max_diff(traj, ref) < ATOL_DPM


def test_dpmpp_2m_differs_from_first_order(schedule):
    """Guards the parity test: the second-order correction moves the result far beyond ATOL_DPM
    (a solver that silently stayed first order would not match diffusers)."""
    net = LinearNet(seed=2)
    timesteps = timestep_grid(NUM_TRAIN, 10, spacing="linspace")
    d = Denoiser(net, schedule, PREDICTIONS["eps"])  # type: ignore[arg-type]
    second = sample_dpmpp_2m(d, x_T(), timesteps, schedule)
    first = sample_ddim(d, x_T(), timesteps, schedule)  # DDIM = first-order DPM-Solver++
    assert (second - first).abs().max() > 100 * ATOL_DPM


def test_dpmpp_2m_matches_stock_float32_diffusers(schedule):
    """Against an unmodified float32 scheduler: agreement to float32 rounding."""
    net = LinearNet(seed=3)
    timesteps = timestep_grid(NUM_TRAIN, 20, spacing="linspace")
    ref = dpm_reference(net, schedule, 20, "epsilon", float64=False)
    traj = ours_trajectory(
        lambda d, cb: sample_dpmpp_2m(d, x_T(), timesteps, schedule, callback=cb),
        net,
        schedule,
        "eps",
    )
    assert max_diff(traj, ref) < 1e-4


# --- Karras et al. 2022 samplers: diffusers' Euler, Euler ancestral, Heun and UniPC ------------
# These schedulers step x / alpha = x0 + sigma eps (EDM's scaling) and feed the network
# ``scale_model_input(x) = x / sqrt(1 + sigma^2)``, which is our x_t; trajectories are compared as
# x_t. Their float32 sigma tables are checked against ours and then replaced by our float64 ones.

BETAS = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}  # Heun's differ
SPACING_CASES = [("leading", False), ("trailing", False), ("linspace", True)]  # (diffusers, karras)


def our_grid(schedule: NoiseSchedule, num_steps: int, spacing: str, karras: bool) -> Tensor:
    return sampling_grid(schedule, num_steps, spacing="karras" if karras else spacing)


def use_our_sigmas(ref_sched, timesteps: Tensor, sigmas: Tensor) -> None:
    """Check diffusers' grid against ours to float32 rounding, then use ours. (Its smallest
    sigma, sqrt(1 - alpha_bar_0) / ..., loses ~1e-4 relative to float32 cancellation.)"""
    torch.testing.assert_close(ref_sched.timesteps.double(), timesteps.double(), rtol=0, atol=1e-2)
    torch.testing.assert_close(ref_sched.sigmas.double(), sigmas, rtol=2e-4, atol=0)
    ref_sched.timesteps = timesteps.double()  # Euler refuses integer tensors as timesteps
    ref_sched.sigmas = sigmas.clone()


def run_scaled(ref_sched, net: LinearNet, sigmas: Tensor, **step_kwargs) -> list[Tensor]:
    """diffusers' loop in x / alpha, recorded as x_t at every grid point and at the end."""
    x = x_T() * math.sqrt(1 + sigmas[0].item() ** 2)
    ref = [x_T()]
    for i, t in enumerate(ref_sched.timesteps):
        x = ref_sched.step(net(ref_sched.scale_model_input(x, t), t), t, x, **step_kwargs)
        x = x.prev_sample
        ref.append(x / math.sqrt(1 + sigmas[i + 1].item() ** 2))
    return ref


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize(("spacing", "karras"), SPACING_CASES)
def test_euler_matches_diffusers(schedule, dname, ours, spacing, karras):
    """EulerDiscreteScheduler (Karras sigmas over a linspace grid = our ``karras`` spacing)."""
    net = LinearNet(seed=4)
    timesteps = our_grid(schedule, 15, spacing, karras)
    sigmas = torch.tensor(grid_sigmas(timesteps, schedule), dtype=torch.float64)
    ref_sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=NUM_TRAIN,
        **BETAS,
        prediction_type=dname,
        timestep_spacing=spacing,
        use_karras_sigmas=karras,
    )
    ref_sched.set_timesteps(15)
    use_our_sigmas(ref_sched, timesteps, sigmas)
    ref = run_scaled(ref_sched, net, sigmas)
    traj = ours_trajectory(
        lambda d, cb: sample_euler(d, x_T(), timesteps, schedule, callback=cb), net, schedule, ours
    )
    assert max_diff(traj, ref) < ATOL_DPM  # diffusers steps in float32


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_ancestral_matches_diffusers(schedule, dname, ours, spacing):
    """EulerAncestralDiscreteScheduler draws ``randn(shape, generator, dtype)`` once per step
    (the last one multiplied by sigma_up = 0); ours draws the same stream on every step but the
    last, so one seed gives the same noise."""
    net = LinearNet(seed=5)
    timesteps = timestep_grid(NUM_TRAIN, 15, spacing=spacing)
    sigmas = torch.tensor(grid_sigmas(timesteps, schedule), dtype=torch.float64)
    ref_sched = diffusers.EulerAncestralDiscreteScheduler(
        num_train_timesteps=NUM_TRAIN,
        **BETAS,
        prediction_type=dname,
        timestep_spacing=spacing,
    )
    ref_sched.set_timesteps(15)
    use_our_sigmas(ref_sched, timesteps, sigmas)
    ref = run_scaled(ref_sched, net, sigmas, generator=torch.Generator().manual_seed(9))
    g_ours = torch.Generator().manual_seed(9)
    traj = ours_trajectory(
        lambda d, cb: sample_euler_ancestral(
            d, x_T(), timesteps, schedule, generator=g_ours, callback=cb
        ),
        net,
        schedule,
        ours,
    )
    assert max_diff(traj, ref) < ATOL_DPM  # diffusers steps in float32


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize(("spacing", "karras"), SPACING_CASES)
def test_heun_matches_diffusers(schedule, dname, ours, spacing, karras):
    """HeunDiscreteScheduler takes every interior grid point twice (2N - 1 calls); the
    trajectory is compared after each completed step."""
    net = LinearNet(seed=6)
    n = 12
    timesteps = our_grid(schedule, n, spacing, karras)
    sigmas = torch.tensor(grid_sigmas(timesteps, schedule), dtype=torch.float64)
    ref_sched = diffusers.HeunDiscreteScheduler(
        num_train_timesteps=NUM_TRAIN,
        **BETAS,
        prediction_type=dname,
        timestep_spacing=spacing,
        use_karras_sigmas=karras,
    )
    ref_sched.set_timesteps(n)
    use_our_sigmas(
        ref_sched,
        torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]),
        torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]),
    )
    x = x_T() * math.sqrt(1 + sigmas[0].item() ** 2)
    ref = [x_T()]
    for k, t in enumerate(ref_sched.timesteps):
        x = ref_sched.step(net(ref_sched.scale_model_input(x, t), t), t, x).prev_sample
        if ref_sched.state_in_first_order or k == 2 * n - 2:  # a step is complete
            sigma = sigmas[len(ref)].item()
            ref.append(x / math.sqrt(1 + sigma**2))
    calls = [0]

    def counting(x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        calls[0] += 1
        return net(x, t)

    traj = ours_trajectory(
        lambda d, cb: sample_heun(d, x_T(), timesteps, schedule, callback=cb),
        counting,  # type: ignore[arg-type]
        schedule,
        ours,
    )
    assert calls[0] == len(ref_sched.timesteps) == 2 * n - 1
    assert max_diff(traj, ref) < ATOL64


class RoundedTime:
    """The net called at round(t): diffusers' multistep schedulers round Karras timesteps for
    the network (their updates use the exact sigmas), where ours pass the fractional t. Parity of
    the updates is checked on the same network outputs."""

    def __init__(self, net: LinearNet) -> None:
        self.net = net

    def __call__(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        return self.net(x, t.round())


def multistep_reference(ref_sched, net: LinearNet, timesteps: Tensor, sigmas: Tensor):
    """diffusers' loop in x_t; the network at the scheduler's (rounded) timesteps."""
    torch.testing.assert_close(ref_sched.sigmas.double(), sigmas, rtol=2e-4, atol=0)
    assert torch.equal(ref_sched.timesteps, timesteps.round().long())
    ref_sched.sigmas = sigmas.clone()
    x = x_T()
    ref = [x]
    for t in ref_sched.timesteps:
        x = ref_sched.step(net(x, t), t, x).prev_sample
        ref.append(x)
    return ref


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpmpp_2m_karras_matches_diffusers(schedule, dname, ours, num_steps):
    """DPMSolverMultistepScheduler(use_karras_sigmas=True): DPM-Solver++(2M) Karras."""
    net = LinearNet(seed=7)
    timesteps = sampling_grid(schedule, num_steps, spacing="karras")
    sigmas = torch.tensor(grid_sigmas(timesteps, schedule), dtype=torch.float64)
    ref_sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN,
        **BETAS,
        prediction_type=dname,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    ref_sched.set_timesteps(num_steps)
    ref = multistep_reference(ref_sched, net, timesteps, sigmas)
    traj = ours_trajectory(
        lambda d, cb: sample_dpmpp_2m(d, x_T(), timesteps, schedule, callback=cb),
        RoundedTime(net),  # type: ignore[arg-type]
        schedule,
        ours,
    )
    assert max_diff(traj, ref) < ATOL_DPM


@pytest.mark.parametrize(("dname", "ours"), PARAM_CASES)
@pytest.mark.parametrize(
    ("num_steps", "karras"), [(10, False), (20, False), (3, False), (10, True)]
)
def test_unipc_matches_diffusers(schedule, dname, ours, num_steps, karras):
    """UniPCMultistepScheduler's defaults: UniP-2 / UniC with bh2, data prediction, lower
    order on the first and last steps; compared on the predictor's x_t at every grid point."""
    net = LinearNet(seed=8)
    timesteps = our_grid(schedule, num_steps, "linspace", karras)
    sigmas = torch.tensor(grid_sigmas(timesteps, schedule), dtype=torch.float64)
    ref_sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN,
        **BETAS,
        prediction_type=dname,
        use_karras_sigmas=karras,
    )
    ref_sched.set_timesteps(num_steps)
    ref = multistep_reference(ref_sched, net, timesteps, sigmas)
    traj = ours_trajectory(
        lambda d, cb: sample_unipc(d, x_T(), timesteps, schedule, callback=cb),
        RoundedTime(net),  # type: ignore[arg-type]
        schedule,
        ours,
    )
    assert max_diff(traj, ref) < ATOL64


def test_unipc_corrector_matters(schedule):
    """Guards the parity test: without the corrector (DPM-Solver++(2M)'s predictor alone) the
    result moves far beyond the tolerance."""
    net = LinearNet(seed=8)
    timesteps = timestep_grid(NUM_TRAIN, 10, spacing="linspace")
    d = Denoiser(net, schedule, PREDICTIONS["eps"])  # type: ignore[arg-type]
    unipc = sample_unipc(d, x_T(), timesteps, schedule)
    assert (unipc - sample_dpmpp_2m(d, x_T(), timesteps, schedule)).abs().max() > 1e-3
