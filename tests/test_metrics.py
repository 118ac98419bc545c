"""FID, KID, IS and the half-sample interval against closed forms and a SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from diffusion_core.evaluation.fidelity import half_sample_interval
from tests.oracles import frechet_distance, inception_score, kernel_inception_distance


def features(n: int, *, shift: float = 0.0, seed: int = 0, d: int = 8) -> torch.Tensor:
    """n draws of one fixed correlated Gaussian in d dimensions, shifted by ``shift``."""
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ (mixing / d**0.5) + shift


def test_fid_matches_scipy_reference_and_is_zero_on_itself():
    f1, f2 = features(500), features(400, shift=0.3, seed=1)
    mu1, mu2 = f1.mean(0).numpy(), f2.mean(0).numpy()
    s1, s2 = np.cov(f1.numpy(), rowvar=False), np.cov(f2.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    reference = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(f1, f2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_gaussians_with_known_moments():
    """N(0, I) vs N(m, I): FID = ||m||^2 up to sampling error."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0, 0, 0])
    assert frechet_distance(a, b) == pytest.approx(1.0, abs=0.02)


def test_kid_unbiased_near_zero_for_same_distribution_and_positive_when_shifted():
    same = [
        kernel_inception_distance(features(300, seed=s), features(300, seed=s + 50))
        for s in range(5)
    ]
    assert abs(float(np.mean(same))) < 0.01
    assert kernel_inception_distance(features(300), features(300, shift=1.0, seed=7)) > 0.1


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(5, 1) * 50  # every class equally often, each certain
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.zeros(50, 10)) == pytest.approx(1.0)  # uninformative


def test_half_sample_interval_contains_estimate_and_shrinks_with_n():
    a, b = features(200), features(200, shift=0.2, seed=1)
    lo, hi = half_sample_interval(frechet_distance, a, b)
    assert lo < frechet_distance(a, b) < hi
    big_a, big_b = features(2000, seed=2), features(2000, shift=0.2, seed=3)
    lo_big, hi_big = half_sample_interval(frechet_distance, big_a, big_b)
    assert hi_big - lo_big < (hi - lo) / 2
