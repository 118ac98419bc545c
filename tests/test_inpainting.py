"""RePaint inpainting, classifier-free guidance and mask loading."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from diffusion_core import repaint
from diffusion_core.guidance import ClassifierFreeGuidance, concat_cond
from diffusion_core.io import read_mask
from diffusion_core.parameterization import PREDICTIONS, Cond, Denoiser
from diffusion_core.repaint import inpaint, repaint_schedule
from diffusion_core.schedules import NoiseSchedule, timestep_grid

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
NUM_TRAIN = 1000

# A joint Gaussian over the 4 pixels of a (1, 2, 2) image; pixels 0 and 3 are known.
MU = torch.tensor([0.2, -0.3, 0.5, 0.0], dtype=F64)
_A = torch.tensor(
    [[1.0, 0, 0, 0], [0.7, 0.6, 0, 0], [0.5, 0.3, 0.5, 0], [-0.2, 0.4, 0.3, 0.6]], dtype=F64
)
SIGMA = _A @ _A.T
KNOWN_IDX, UNKNOWN_IDX = [0, 3], [1, 2]
X_KNOWN = torch.tensor([1.0, -0.8], dtype=F64)


def conditional() -> tuple[Tensor, Tensor]:
    """Mean and covariance of the unknown pixels given the known ones (Gaussian conditioning)."""
    s_kk = SIGMA[KNOWN_IDX][:, KNOWN_IDX]
    s_uk = SIGMA[UNKNOWN_IDX][:, KNOWN_IDX]
    mean = MU[UNKNOWN_IDX] + s_uk @ torch.linalg.solve(s_kk, X_KNOWN - MU[KNOWN_IDX])
    cov = SIGMA[UNKNOWN_IDX][:, UNKNOWN_IDX] - s_uk @ torch.linalg.solve(s_kk, s_uk.T)
    return mean, cov


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", NUM_TRAIN)


class ImageGaussianOracle:
    """Exact E[x0 | x_t] for images (B, 1, 2, 2) whose 4 pixels are N(MU, SIGMA)."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.alpha_bar = schedule.alphas_cumprod

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        assert bool((t == t[0]).all())
        alpha_bar = self.alpha_bar[t[0]]
        alpha = alpha_bar.sqrt()
        cov_t = alpha_bar * SIGMA + (1 - alpha_bar) * torch.eye(4, dtype=F64)
        gain = alpha * SIGMA @ torch.linalg.inv(cov_t)  # (4, 4)
        flat = x_t.reshape(x_t.shape[0], 4)  # (B, 1, 2, 2) -> (B, 4)
        return (MU + (flat - alpha * MU) @ gain.T).reshape(x_t.shape)


def known_image(batch: int) -> tuple[Tensor, Tensor]:
    """(known (B, 1, 2, 2), mask (1, 1, 2, 2)) with pixels 0 and 3 known."""
    known = torch.zeros(batch, 4, dtype=F64)
    known[:, KNOWN_IDX] = X_KNOWN
    mask = torch.zeros(4, dtype=F64)
    mask[KNOWN_IDX] = 1
    return known.reshape(batch, 1, 2, 2), mask.reshape(1, 1, 2, 2)


# --- RePaint jump schedule -----------------------------------------------------------------------


def test_repaint_schedule_by_hand():
    # RePaint's get_schedule_jump(t_T=6, jump_length=2, jump_n_sample=2) visits levels
    # 5 4 3 2 3 4 3 2 1 0 1 2 1 0 -1; position = 5 - level.
    assert repaint_schedule(6, jump_length=2, resample=2) == [
        0,
        1,
        2,
        3,
        2,
        1,
        2,
        3,
        4,
        5,
        4,
        3,
        4,
        5,
        6,
    ]


@pytest.mark.parametrize(("n", "j", "r"), [(50, 10, 10), (50, 5, 10), (20, 10, 3), (7, 10, 10)])
def test_repaint_schedule_structure(n, j, r):
    pos = repaint_schedule(n, jump_length=j, resample=r)
    assert pos[0] == 0 and pos[-1] == n
    assert all(abs(b - a) == 1 for a, b in itertools.pairwise(pos))
    assert min(pos) == 0 and max(pos) == n
    num_jump_points = len(range(0, n - j, j))
    forward = sum(b < a for a, b in itertools.pairwise(pos))
    assert forward == num_jump_points * (r - 1) * j


def test_repaint_schedule_without_resampling():
    assert repaint_schedule(30, jump_length=10, resample=1) == list(range(31))


@pytest.mark.parametrize(("j", "r"), [(0, 10), (10, 0)])
def test_repaint_schedule_bad_knobs(j, r):
    with pytest.raises(ValueError, match=r"jump_length|resample"):
        repaint_schedule(10, jump_length=j, resample=r)


# --- inpaint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", [(3, 1, 8, 8), (1, 1, 8, 8), (3, 2, 8, 8)])
def test_known_region_is_exact(schedule, mask_shape):
    """The output equals ``known`` bit for bit where mask == 1 (float32, random mask)."""
    g = torch.Generator().manual_seed(0)
    known = torch.rand(3, 2, 8, 8, generator=g) * 2 - 1
    mask = (torch.rand(mask_shape, generator=g) > 0.5).float()
    out = inpaint(
        lambda x, t: 0.9 * x,
        known,
        mask,
        timestep_grid(NUM_TRAIN, 20),
        schedule,
        generator=g,
        jump_length=5,
        resample=3,
    )
    assert out.dtype == torch.float32 and out.shape == known.shape
    keep = mask.expand_as(known).bool()
    assert torch.equal(out[keep], known[keep])
    assert not torch.equal(out[~keep], known[~keep])


N_SAMPLES = 10_000
# RePaint with this grid is not an exact conditional sampler: its exact output moments, computed
# without sampling noise by test_exact_conditional_moments, are off by at most 0.0059 (mean) and
# 0.0387 (covariance); the allowances below round those up.
GRID, JUMP, RESAMPLE = 50, 5, 10
MEAN_ALLOWANCE, COV_ALLOWANCE = 0.007, 0.045


def test_unknown_region_follows_conditional_gaussian(schedule):
    """Samples of the unknown pixels match the conditional Gaussian given the known ones.

    Tolerance: 5 standard errors of the sample mean, sqrt(C_ii / N), and of the sample
    covariance, sqrt((C_ij^2 + C_ii C_jj) / N), plus the allowance for RePaint's own bias. The
    conditional mean is 0.31 and 0.12 away from the prior mean, far outside the tolerance, so an
    unknown region that ignored the known pixels (or was noise) fails.
    """
    known, mask = known_image(N_SAMPLES)
    g = torch.Generator().manual_seed(1)
    timesteps = timestep_grid(NUM_TRAIN, GRID)
    oracle = ImageGaussianOracle(schedule)
    out = inpaint(
        oracle, known, mask, timesteps, schedule, generator=g, jump_length=JUMP, resample=RESAMPLE
    )
    flat = out.reshape(N_SAMPLES, 4)
    assert torch.equal(flat[:, KNOWN_IDX], X_KNOWN.expand(N_SAMPLES, 2))
    unknown = flat[:, UNKNOWN_IDX]
    c_mean, c_cov = conditional()
    assert (c_mean - MU[UNKNOWN_IDX]).abs().min() > 0.1
    diag = c_cov.diagonal()
    se_mean = (diag / N_SAMPLES).sqrt()
    se_cov = ((c_cov**2 + torch.outer(diag, diag)) / N_SAMPLES).sqrt()
    assert ((unknown.mean(0) - c_mean).abs() <= 5 * se_mean + MEAN_ALLOWANCE).all()
    assert ((torch.cov(unknown.T) - c_cov).abs() <= 5 * se_cov + COV_ALLOWANCE).all()


def exact_inpaint_moments(
    schedule: NoiseSchedule, monkeypatch: pytest.MonkeyPatch, resample: int
) -> tuple[Tensor, Tensor]:
    """Exact mean and covariance of the unknown pixels: with the Gaussian oracle the output is
    affine in the noise draws z_k, out = c + sum_k J_k z_k, so one run with zero noise tensors
    that require grad gives c and, by autograd, every J_k; cov = sum_k J_k J_k^T."""
    noises: list[Tensor] = []

    def zero_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
        z = torch.zeros_like(x, requires_grad=True)
        noises.append(z)
        return z

    monkeypatch.setattr(repaint, "standard_normal", zero_noise)
    known, mask = known_image(1)
    out = inpaint(
        ImageGaussianOracle(schedule),
        known,
        mask,
        timestep_grid(NUM_TRAIN, GRID),
        schedule,
        generator=torch.Generator(),
        jump_length=JUMP,
        resample=resample,
    ).reshape(4)[UNKNOWN_IDX]
    grads = [torch.autograd.grad(out[i], noises, retain_graph=True) for i in range(2)]
    cov = torch.zeros(2, 2, dtype=F64)
    for k in range(len(noises)):
        J_k = torch.stack([grads[i][k].reshape(4) for i in range(2)])  # (2, 4)
        cov += J_k @ J_k.T
    return out.detach(), cov


def test_exact_conditional_moments(schedule, monkeypatch):
    """Resampling is what makes RePaint condition properly (Lugmayr et al., Sec. 4.2): without it
    the exact mean is off by 0.086, with it by < MEAN_ALLOWANCE."""
    c_mean, c_cov = conditional()
    mean, cov = exact_inpaint_moments(schedule, monkeypatch, RESAMPLE)
    assert (mean - c_mean).abs().max() <= MEAN_ALLOWANCE
    assert (cov - c_cov).abs().max() <= COV_ALLOWANCE
    mean_1, _ = exact_inpaint_moments(schedule, monkeypatch, 1)
    assert (mean_1 - c_mean).abs().max() > 5 * MEAN_ALLOWANCE


def test_inpaint_bad_mask(schedule):
    known = torch.zeros(2, 3, 4, 4)
    grid = timestep_grid(NUM_TRAIN, 5)
    g = torch.Generator()
    with pytest.raises(ValueError, match="broadcast"):
        inpaint(lambda x, t: x, known, torch.ones(2, 3, 5, 5), grid, schedule, generator=g)
    with pytest.raises(ValueError, match="broadcast"):
        inpaint(lambda x, t: x, known, torch.ones(4, 1, 4, 4), grid, schedule, generator=g)
    with pytest.raises(ValueError, match=r"0 .*or 1"):
        inpaint(lambda x, t: x, known, torch.full((1, 1, 4, 4), 0.5), grid, schedule, generator=g)
    with pytest.raises(ValueError, match="fixed_small"):
        inpaint(
            lambda x, t: x, known, torch.ones(1, 1, 4, 4), grid, schedule, generator=g, variance="x"
        )


# --- classifier-free guidance -----------------------------------------------------------------


class LabelNet:
    """A deterministic class-conditional "network" that records the batch size of each call."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(10, 3, generator=g, dtype=F64)
        self.calls: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        assert cond is not None and cond.labels is not None
        assert cond.labels.shape[0] == x.shape[0]
        self.calls.append(x.shape[0])
        bias = self.emb[cond.labels][:, :, None, None]  # (B, 3) -> (B, 3, 1, 1)
        extra = 0.0 if cond.pooled is None else cond.pooled.sum(1)[:, None, None, None]
        return 0.3 * x + 2.0 * bias + extra + 1e-3 * t.to(x.dtype)[:, None, None, None]


def cfg_setup(clip_x0: bool = False):
    schedule = NoiseSchedule.from_name("linear", NUM_TRAIN)
    net = LabelNet()
    denoiser = Denoiser(net, schedule, PREDICTIONS["eps"], clip_x0=clip_x0)  # type: ignore[arg-type]
    cond = Cond(labels=torch.tensor([1, 2, 3, 4]))
    null = Cond(labels=torch.tensor([0, 0, 0, 0]))
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.full((4,), 300)
    return net, denoiser, cond, null, x, t


def test_cfg_scale_one_is_conditional_in_one_call():
    net, denoiser, cond, null, x, t = cfg_setup()
    guided = ClassifierFreeGuidance(denoiser, cond, null, 1.0)(x, t)
    assert net.calls == [4]
    assert torch.equal(guided, denoiser.with_cond(cond)(x, t))


def test_cfg_scale_zero_is_unconditional():
    _, denoiser, cond, null, x, t = cfg_setup()
    guided = ClassifierFreeGuidance(denoiser, cond, null, 0.0)(x, t)
    torch.testing.assert_close(guided, denoiser.with_cond(null)(x, t), rtol=0, atol=1e-12)


def test_cfg_batched_call_equals_two_calls():
    net, denoiser, cond, null, x, t = cfg_setup()
    guided = ClassifierFreeGuidance(denoiser, cond, null, 4.0)(x, t)
    assert net.calls == [8]  # one network call on the 2B batch
    x0_c, x0_u = denoiser.with_cond(cond)(x, t), denoiser.with_cond(null)(x, t)
    torch.testing.assert_close(guided, x0_u + 4.0 * (x0_c - x0_u), rtol=0, atol=1e-12)
    # a scalar t is accepted too
    scalar = ClassifierFreeGuidance(denoiser, cond, null, 4.0)(x, torch.tensor(300))
    torch.testing.assert_close(scalar, guided, rtol=0, atol=0)


@pytest.mark.parametrize(("interval", "guides"), [((1.0, 1.5), True), ((1.5, 5.0), False)])
def test_cfg_guides_only_inside_its_interval(interval, guides):
    """Kynkaanniemi et al. 2024: guidance at low < sigma <= high only; outside it the
    conditional prediction alone, in one call on B. At t = 300 sigma is about 1.24."""
    net, denoiser, cond, null, x, t = cfg_setup()
    sigma = float(denoiser.schedule.sigma_at(t[:1])[0])
    assert 1.2 < sigma < 1.3
    guided = ClassifierFreeGuidance(denoiser, cond, null, 4.0, interval=interval)(x, t)
    plain = ClassifierFreeGuidance(denoiser, cond, null, 4.0)(x, t)
    assert net.calls == [8 if guides else 4, 8]
    expected = plain if guides else denoiser.with_cond(cond)(x, t)
    torch.testing.assert_close(guided, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="low < high"):
        ClassifierFreeGuidance(denoiser, cond, null, 4.0, interval=(1.0, 0.5))


def test_cfg_clips_after_guidance():
    _, denoiser, cond, null, x, t = cfg_setup(clip_x0=True)
    guided = ClassifierFreeGuidance(denoiser, cond, null, 3.0)(x, t)
    unclipped = Denoiser(denoiser.net, denoiser.schedule, denoiser.prediction)
    x0_c, x0_u = unclipped.with_cond(cond)(x, t), unclipped.with_cond(null)(x, t)
    expected = (x0_u + 3.0 * (x0_c - x0_u)).clamp(-1, 1)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-12)
    clipped_first = x0_u.clamp(-1, 1) + 3.0 * (x0_c.clamp(-1, 1) - x0_u.clamp(-1, 1))
    assert (clipped_first - guided).abs().max() > 0.1  # the order matters for this input
    assert guided.abs().max() <= 1


def test_cfg_concatenates_every_cond_field():
    pooled = torch.arange(8, dtype=F64).reshape(4, 2)
    both = concat_cond(
        Cond(labels=torch.tensor([1, 2, 3, 4]), pooled=pooled),
        Cond(labels=torch.zeros(4, dtype=torch.long), pooled=torch.zeros(4, 2, dtype=F64)),
    )
    assert both.labels is not None and both.pooled is not None and both.context is None
    assert both.labels.tolist() == [1, 2, 3, 4, 0, 0, 0, 0]
    assert torch.equal(both.pooled[:4], pooled) and not both.pooled[4:].any()


def test_cfg_mismatched_conds_raise():
    with pytest.raises(ValueError, match="pooled"):
        concat_cond(
            Cond(labels=torch.tensor([1]), pooled=torch.zeros(1, 2)), Cond(labels=torch.tensor([0]))
        )
    with pytest.raises(ValueError, match=r"labels.*shape"):
        concat_cond(Cond(labels=torch.tensor([1, 2])), Cond(labels=torch.tensor([0])))


# --- load_mask --------------------------------------------------------------------------------

PATTERN = np.array(
    [
        [255, 0, 128, 127, 0, 255],
        [0, 0, 255, 255, 10, 200],
        [250, 255, 0, 0, 0, 0],
        [0, 1, 2, 3, 4, 255],
    ],
    dtype=np.uint8,
)


def test_read_mask_png_round_trip(tmp_path: Path):
    path = tmp_path / "mask.png"
    Image.fromarray(PATTERN).save(path)
    mask = read_mask(path)
    assert mask.shape == (1, 1, 4, 6) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], torch.from_numpy((PATTERN >= 128).astype(np.float32)))
    # Nothing is resized: a mask of another size than the image is refused, naming both.
    with pytest.raises(ValueError, match=r"mask is 6x4, the image is 8x8"):
        read_mask(str(path), 8)


def test_read_mask_rgb_png(tmp_path: Path):
    path = tmp_path / "rgb.png"
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2] = 255  # top half white = known
    Image.fromarray(rgb).save(path)
    mask = read_mask(path, 4)
    assert mask[0, 0, :2].eq(1).all() and mask[0, 0, 2:].eq(0).all()


def test_read_mask_from_arrays():
    assert torch.equal(read_mask(PATTERN), read_mask(PATTERN >= 128))
    floats = (PATTERN >= 128).astype(np.float64) * 0.8
    assert torch.equal(read_mask(floats), read_mask(PATTERN >= 128))
    with pytest.raises(ValueError, match="must be"):
        read_mask(np.zeros((2, 2, 2, 2)), 2)


def test_read_mask_unreadable_names_the_file(tmp_path: Path):
    missing = tmp_path / "no_such_mask.png"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        read_mask(missing, 8)
    garbage = tmp_path / "garbage_mask.png"
    garbage.write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        read_mask(garbage, 8)
