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
from diffusion_core.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from diffusion_core.schedules import NoiseSchedule, timestep_grid

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
