"""torch-fidelity as the metrics engine: its numbers against the float64 oracle in
``tests/oracles.py``, NumPy/SciPy references and definitions, through its own API with the
registered domain extractor, and with Inception weights this test writes itself."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import torch_fidelity
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from diffusion_core.config import EvaluationConfig
from diffusion_core.evaluation import fidelity, quality
from diffusion_core.evaluation.judge import SmallCNN, TrainedClassifier, save_classifier
from diffusion_core.io import sha256_file
from tests import oracles as metrics


def features(n: int, *, shift: float = 0.0, seed: int = 0, d: int = 8) -> torch.Tensor:
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ (mixing / d**0.5) + shift


def images(n: int, *, seed: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# Metrics on features.


def test_fid_matches_float64_oracle_and_scipy():
    f1, f2 = features(500), features(400, shift=0.3, seed=1)
    mu1, mu2 = f1.mean(0).numpy(), f2.mean(0).numpy()
    s1, s2 = np.cov(f1.numpy(), rowvar=False), np.cov(f2.numpy(), rowvar=False)
    scipy_fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert fidelity.fid(f1, f2) == pytest.approx(metrics.frechet_distance(f1, f2), rel=1e-9)
    assert fidelity.fid(f1, f2) == pytest.approx(scipy_fid, rel=1e-8)
    assert fidelity.fid(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_kid_on_whole_sets_is_the_unbiased_mmd():
    """With subsets as large as the sets, every torch-fidelity subset is the whole set."""
    f1, f2 = features(120), features(120, shift=0.5, seed=1)
    assert fidelity.kid(f1, f2, subsets=3) == pytest.approx(
        metrics.kernel_inception_distance(f1, f2), rel=1e-9
    )
    same = [
        fidelity.kid(features(300, seed=s), features(300, seed=s + 50), subsets=5) for s in range(5)
    ]
    assert abs(float(np.mean(same))) < 0.01
    assert fidelity.kid(features(300), features(300, shift=1.0, seed=7)) > 0.1


def _prc_reference(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 by brute force: a point is inside a set's manifold when it lies in
    the ball of some member whose radius is the distance to that member's k-th nearest neighbour
    (itself excluded)."""

    def radii(x: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points: np.ndarray, manifold: np.ndarray) -> float:
        d = np.linalg.norm(points[:, None] - manifold[None], axis=-1)
        return float((d <= radii(manifold)[None]).any(axis=1).mean())

    return inside(gen, ref), inside(ref, gen)


def test_precision_recall_match_brute_force_and_definition():
    gen, ref = features(150, shift=0.4, seed=2), features(170, seed=3)
    pr = fidelity.precision_recall(gen, ref)
    precision, recall = _prc_reference(gen.numpy(), ref.numpy())
    assert pr["precision"] == pytest.approx(precision) and pr["recall"] == pytest.approx(recall)
    assert 0 < pr["precision"] < 1 and 0 < pr["recall"] < 1
    # The same set: everything inside. Far apart: nothing.
    assert fidelity.precision_recall(ref, ref) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    )
    far = fidelity.precision_recall(ref + 100.0, ref)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # Mode dropping: generated samples cover one of two reference modes -> precise, half recall.
    two_modes = torch.cat([features(100, seed=4), features(100, shift=50.0, seed=5)])
    one_mode = features(100, seed=6)
    dropped = fidelity.precision_recall(one_mode, two_modes)
    assert dropped["precision"] > 0.9 and 0.35 < dropped["recall"] <= 0.5  # second mode missed
    assert dropped["recall"] == pytest.approx(
        _prc_reference(one_mode.numpy(), two_modes.numpy())[1]
    )


# ----------------------------------------------------------------------------------------------
# The domain extractor, through torch-fidelity's own API.


@pytest.fixture
def domain_dir(tmp_path: Path) -> tuple[Path, SmallCNN]:
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, image_size=8, num_classes=4).eval()
    save_classifier(TrainedClassifier(net, 0.5), tmp_path / "judge")
    return tmp_path / "judge", net


def test_floor_draws_one_draw_is_the_split_it_says():
    """One draw: the reference split in halves A, B and h generated rows, drawn from the seeded
    generator in that order; FID, precision and recall of (G, A) and (B, A)."""
    gen, ref = features(400, shift=0.2, seed=3), features(101, seed=4)
    out = fidelity.floor_draws(gen, ref, draws=1, seed=7)
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(101, generator=g)
    a, b = ref[perm[:50]], ref[perm[50:100]]
    sub = gen[torch.randperm(400, generator=g)[:50]]
    assert out["h"] == 50
    assert out["fid_h"] == pytest.approx(fidelity.fid(sub, a), rel=1e-12)
    assert out["fid_floor_h"] == pytest.approx(fidelity.fid(b, a), rel=1e-12)
    assert out["recall_h"] == fidelity.precision_recall(sub, a)["recall"]
    assert out["precision_floor_h"] == fidelity.precision_recall(b, a)["precision"]


def test_floor_draws_tell_a_shifted_set_from_the_real_one():
    """Same distribution: FID at equal counts near the floor (the mean of 40 draws within a
    quarter of it); a set shifted by one standard deviation: far above it, lower recall."""
    ref = features(300, seed=5)
    same = fidelity.floor_draws(features(1000, seed=6), ref, draws=40)
    shifted = fidelity.floor_draws(features(1000, seed=6, shift=1.0), ref, draws=40)
    assert abs(same["fid_gap"]) < 0.25 * same["fid_floor_h"]
    assert abs(same["recall_h"] - same["recall_floor_h"]) < 0.05
    assert shifted["fid_gap"] > 5 * same["fid_floor_h"]
    assert shifted["recall_h"] < same["recall_h"] - 0.2


def test_floor_draws_gap_interval_is_the_monte_carlo_error_of_its_mean():
    """The gap's 95% interval over 20 draws, from 12 seeds, covers the mean of 600 draws in at
    least 9 (an interval of half the width would cover it about 2 times in 3, of a quarter about
    1 in 3); sixteen times the draws give a quarter of the width."""
    gen, ref = features(1000, shift=0.3, seed=8), features(300, seed=9)
    target = fidelity.floor_draws(gen, ref, draws=600, seed=100)["fid_gap"]
    runs = [fidelity.floor_draws(gen, ref, draws=20, seed=s) for s in range(12)]
    assert all(r["fid_gap_low"] < r["fid_gap"] < r["fid_gap_high"] for r in runs)
    assert sum(r["fid_gap_low"] <= target <= r["fid_gap_high"] for r in runs) >= 9
    many = fidelity.floor_draws(gen, ref, draws=320)
    width = many["fid_gap_high"] - many["fid_gap_low"]
    assert 0.2 < width / (runs[0]["fid_gap_high"] - runs[0]["fid_gap_low"]) < 0.32


def test_paired_fid_gap_cancels_shared_noise():
    """A set against itself: gap 0 with a zero-width interval. Two sets that share their seeds
    (the second is the first slightly perturbed): the gap is the difference of the two FIDs and
    its interval is much narrower than either FID's own."""
    ref = features(300, seed=8)
    base = features(400, seed=9)
    assert fidelity.paired_fid_gap(base, base, ref, draws=10) == (0.0, 0.0, 0.0)
    g = torch.Generator().manual_seed(10)
    other = base + 0.1 + 0.1 * torch.randn(base.shape, generator=g, dtype=torch.float64)
    gap, low, high = fidelity.paired_fid_gap(other, base, ref, draws=50)
    assert gap == pytest.approx(fidelity.fid(other, ref) - fidelity.fid(base, ref), rel=1e-12)
    assert low < gap < high
    lo, hi = fidelity.half_sample_interval(fidelity.fid, other, ref, draws=50)
    assert (high - low) < 0.5 * (hi - lo)  # measured 0.37x
    with pytest.raises(ValueError, match="same shape"):
        fidelity.paired_fid_gap(other[:10], base, ref)


def test_registered_domain_extractor_through_calculate_metrics(domain_dir):
    path, net = domain_dir
    a, b = images(60, seed=0), images(50, seed=1) // 2  # darker: a different distribution
    out = torch_fidelity.calculate_metrics(
        input1=fidelity.UInt8Images(a, rgb=False),
        input2=fidelity.UInt8Images(b, rgb=False),
        fid=True,
        isc=True,
        isc_splits=1,
        feature_extractor=fidelity.DOMAIN,
        feature_extractor_weights_path=str(path),
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    with torch.no_grad():
        fa, fb, logits = net.features(a), net.features(b), net.head(net.features(a))
    assert out["frechet_inception_distance"] == pytest.approx(
        metrics.frechet_distance(fa, fb), rel=1e-4
    )
    assert out["frechet_inception_distance"] > 0
    assert out["inception_score_mean"] == pytest.approx(metrics.inception_score(logits), rel=1e-5)


def test_score_floor_intervals_and_self_comparison(domain_dir):
    path, net = domain_dir
    ex = fidelity.Extractor(fidelity.DOMAIN, path, "x" * 64)
    reference, generated = images(100, seed=2), images(40, seed=3) // 2
    m = quality.score(generated, reference, ex, draws=30)
    with torch.no_grad():
        fg, fr = net.features(generated), net.features(reference)
    assert m["fid"] == pytest.approx(metrics.frechet_distance(fg, fr), rel=1e-4)
    assert m["fid_low"] < m["fid"] < m["fid_high"] and m["kid_low"] < m["kid"] < m["kid_high"]
    # The floor compares two disjoint reference halves at the generated half's count.
    assert m["num_half"] == 40
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    floor = metrics.frechet_distance(fr[perm[:40]], fr[perm[40:80]])
    assert m["fid_floor_half"] == pytest.approx(floor, rel=1e-4)
    assert m["fid_half"] == pytest.approx(metrics.frechet_distance(fg, fr[perm[:40]]), rel=1e-4)
    assert m["fid_half_over_floor"] > 1
    same = fidelity.calculate(reference, reference, ex)
    assert same.raw["frechet_inception_distance"] == pytest.approx(0.0, abs=1e-6)
    assert same.raw["precision"] == 1.0 and same.raw["recall"] == 1.0


def test_score_runs_the_extractor_once_per_image(domain_dir, monkeypatch):
    """Intervals and floors reuse the features: the extractor sees every image exactly once."""
    path, _ = domain_dir
    seen: list[int] = []
    forward = fidelity.DomainFeatureExtractor.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(fidelity.DomainFeatureExtractor, "forward", counting)
    ex = fidelity.Extractor(fidelity.DOMAIN, path, "x" * 64)
    quality.score(images(40, seed=3), images(100, seed=2), ex, draws=5, batch_size=32)
    assert sum(seen) == 140


def test_only_torch_fidelitys_public_names_are_imported():
    """``torch_fidelity``'s own namespace is its documented API; its submodules are not."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(fidelity))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch_fidelity"):
            assert node.module == "torch_fidelity", node.module
            assert all(hasattr(torch_fidelity, a.name) for a in node.names)
        if isinstance(node, ast.Import):
            assert all(a.name == "torch_fidelity" or "fidelity" not in a.name for a in node.names)


# ----------------------------------------------------------------------------------------------
# Inception weights from a configured file.


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its random initialisation kept (no weights loaded)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def write_inception_weights(path: Path, seed: int, placeholder: Path) -> Path:
    torch.save({}, placeholder)
    torch.manual_seed(seed)
    model = _RandomInception("init", ["2048"], feature_extractor_weights_path=str(placeholder))
    # Batch-norm statistics from one batch, so that activations keep their scale through the
    # random layers (with unit running variances the features would be ~1e-7).
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(images(2, seed=seed, channels=3, size=16))
    torch.save(model.state_dict(), path)
    return path


def inception_features(weights: Path, x: torch.Tensor) -> torch.Tensor:
    model = FeatureExtractorInceptionV3(
        "direct", ["2048"], feature_extractor_weights_path=str(weights)
    )
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.slow  # Inception at 299x299 on CPU: about 15 s
def test_inception_weights_from_path_and_url_are_the_ones_used(tmp_path, single_thread):
    w1 = write_inception_weights(tmp_path / "w1.pth", 1, tmp_path / "empty.pth")
    w2 = write_inception_weights(tmp_path / "w2.pth", 2, tmp_path / "empty.pth")
    sha1 = sha256_file(w1)
    gen, ref = images(4, seed=4, channels=3, size=16), images(4, seed=5, channels=3, size=16) // 2

    by_path = fidelity.inception_extractor(
        EvaluationConfig(extractor="inception-v3-compat", weights=str(w1), weights_sha256=sha1),
        tmp_path / "cache",
    )
    assert by_path.sha256 == sha1 and by_path.weights_path == w1
    result = fidelity.calculate(gen, ref, by_path)
    direct = inception_features(w1, torch.cat([gen, ref]))
    torch.testing.assert_close(result.generated["2048"], direct[:4], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.reference["2048"], direct[4:], rtol=1e-4, atol=1e-6)
    assert result.raw["frechet_inception_distance"] == pytest.approx(
        metrics.frechet_distance(direct[:4], direct[4:]), rel=1e-3
    )

    # Other weights through a URL (fsspec's memory filesystem stands in for a remote store):
    # fetched into the cache, other features and numbers.
    with fsspec.open("memory://weights/w2.pth", "wb") as f:
        f.write(w2.read_bytes())
    by_url = fidelity.inception_extractor(
        EvaluationConfig(extractor="inception-v3-compat", weights="memory://weights/w2.pth"),
        tmp_path / "cache",
    )
    assert by_url.weights_path.parent.parent == tmp_path / "cache"
    assert by_url.sha256 == sha256_file(w2) != sha1
    other = fidelity.calculate(gen, ref, by_url)
    assert not torch.allclose(other.generated["2048"], result.generated["2048"], rtol=1e-2)
    assert other.raw["frechet_inception_distance"] != pytest.approx(
        result.raw["frechet_inception_distance"], rel=1e-3
    )


def test_inception_weights_errors(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"not the weights you expect")
    wrong = "0" * 64
    with fsspec.open("memory://weights/w.bin", "wb") as f:
        f.write(weights.read_bytes())
    for source in (str(weights), weights.as_uri(), "memory://weights/w.bin"):
        ec = EvaluationConfig(extractor="inception-v3-compat", weights=source, weights_sha256=wrong)
        with pytest.raises(fidelity.WeightsError, match=r"evaluation\.weights: .* expected 0000"):
            fidelity.inception_extractor(ec, tmp_path / "cache")
    missing = (str(tmp_path / "nope.pth"), (tmp_path / "nope.pth").as_uri(), "memory://nope.pth")
    for source in missing:
        ec = EvaluationConfig(extractor="inception-v3-compat", weights=source)
        with pytest.raises(fidelity.WeightsError, match=r"evaluation\.weights: .*nope\.pth"):
            fidelity.inception_extractor(ec, tmp_path / "cache")
    assert not [
        p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name
    ]  # nothing half-written


# ----------------------------------------------------------------------------------------------
# The evaluation config.


@pytest.mark.parametrize(
    ("section", "names"),
    [
        ({"extractor": "vgg16"}, "evaluation.extractor"),
        ({"extractor": "inception-v3-compat"}, "evaluation.weights is required"),
        ({"weights": "/w.pth"}, "evaluation.weights and evaluation.weights_sha256 apply only"),
        (
            {"extractor": "inception-v3-compat", "weights": "/w", "weights_sha256": "abc"},
            "evaluation.weights_sha256",
        ),
        ({"sweep": [{"sampler": "lms", "steps": 10}]}, "evaluation.sweep.0.sampler"),
        ({"sweep": [{"sampler": "ddim", "steps": 0}]}, "evaluation.sweep.0.steps"),
        ({"sweep": [{"sampler": "ddim", "steps": 10, "eta": 1}]}, "evaluation.sweep.0.eta"),
        ({"sweep": [{"sampler": "ddim", "steps": 10}] * 2}, "evaluation.sweep repeats ddim:10"),
        ({"interval_level": 1.5}, "evaluation.interval_level"),
        ({"num_samples": 1}, "evaluation.num_samples"),
        ({"extracter": "domain"}, "unknown key 'evaluation.extracter'"),
    ],
)
def test_bad_evaluation_config_names_the_key(section, names):
    from diffusion_core.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_config({"evaluation": section}, source="run.yaml")


def test_evaluation_config_parses_a_sweep():
    from diffusion_core.config import parse_config

    cfg = parse_config(
        {
            "evaluation": {
                "sweep": [{"sampler": "ddpm", "steps": 1000}, {"sampler": "dpmpp_2m", "steps": 10}]
            }
        }
    )
    assert [(s.sampler, s.steps) for s in cfg.evaluation.sweep] == [
        ("ddpm", 1000),
        ("dpmpp_2m", 10),
    ]
    assert cfg.evaluation.extractor == "domain"
