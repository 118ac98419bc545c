"""Sample quality through torch-fidelity: its feature extraction and its FID, KID, Inception Score
and precision/recall, with intervals and the real-vs-real floor around them. One path for images
and volumes: a volume set goes through the same calls, on the features of its own 3-D judge.

Two feature extractors:

- ``domain``: the dataset's own SmallCNN classifier (``diffusion_core.classifier``), registered
  with torch-fidelity as ``diffpipe-domain``: its 64-d penultimate layer for FID, KID and
  precision/recall, its class logits for the Inception Score analogue. Offline and trained per
  dataset, so numbers are comparable only within one dataset (the record says which).
- ``inception-v3-compat``: torch-fidelity's TF-compatible Inception-v3 (pool3, 2048-d), with
  weights from a configured local path or fsspec URL, fetched into a local cache and identified by
  their sha256. Nothing is ever downloaded unless configured.

The tests check these numbers against independent float64 implementations of the same maths
(``tests/oracles.py``) and SciPy.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from diffusion_core.config import EvaluationConfig
from diffusion_core.evaluation.judge import load_classifier
from diffusion_core.io import WeightsError, fetch_weights

DOMAIN = "diffpipe-domain"  # torch-fidelity's registry name of the domain classifier
INCEPTION = "inception-v3-compat"
EXTRACTORS = {"domain": DOMAIN, "inception-v3-compat": INCEPTION}  # config name -> registry name
ENGINE = f"torch-fidelity {torch_fidelity.__version__}"
MIN_IMAGES = 4  # per side: precision/recall needs a 3rd nearest neighbour besides the sample


# ----------------------------------------------------------------------------------------------
# Extractors.


class UInt8Images(Dataset[Tensor]):
    """(N, C, H, W) uint8 images or (N, C, D, H, W) volumes as a torch-fidelity input; grayscale
    images repeated to RGB when the extractor wants three channels (Inception)."""

    def __init__(self, images: Tensor, *, rgb: bool) -> None:
        if images.dtype != torch.uint8 or images.ndim not in (4, 5) or (rgb and images.ndim != 4):
            raise ValueError(
                f"expected (N, C, H, W) uint8 images{'' if rgb else ' or (N, C, D, H, W) volumes'}"
                f", got {images.dtype} {tuple(images.shape)}"
            )
        if rgb and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # (N, 3, H, W)
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i].contiguous()


class DomainFeatureExtractor(FeatureExtractorBase):  # type: ignore[misc]
    """The dataset's SmallCNN (2-D or 3-D) as a torch-fidelity extractor.
    ``feature_extractor_weights_path`` is a classifier directory (``weights.safetensors`` +
    ``meta.json``, see ``save_classifier``)."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise WeightsError(
                f"{name}: feature_extractor_weights_path (a classifier dir) is required"
            )
        self.net = load_classifier(Path(feature_extractor_weights_path)).net

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> None:
        return None

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features = self.net.features(x)  # (B, 64)
        out = {"features": features, "logits": self.net.head(features)}
        return tuple(out[k] for k in self.features_list)


def register_domain_extractor() -> None:
    """Register ``diffpipe-domain`` with torch-fidelity (once per process)."""
    if DOMAIN not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(DOMAIN, DomainFeatureExtractor)


register_domain_extractor()


@dataclass(frozen=True)
class Extractor:
    """A feature extractor ready for torch-fidelity: registry name, local weights, their sha256."""

    name: str
    weights_path: Path
    sha256: str

    @property
    def rgb(self) -> bool:
        return self.name == INCEPTION


def inception_extractor(ec: EvaluationConfig, cache_dir: Path) -> Extractor:
    """The configured Inception weights, fetched and verified."""
    if ec.weights is None:
        raise WeightsError("evaluation.weights is required for inception-v3-compat")
    path, sha = fetch_weights(
        ec.weights, cache_dir, expected_sha256=ec.weights_sha256, what="evaluation.weights"
    )
    return Extractor(INCEPTION, path, sha)


# ----------------------------------------------------------------------------------------------
# Metrics on features (torch-fidelity's implementations).


def fid(f1: Tensor, f2: Tensor) -> float:
    """torch-fidelity's FID (eigenvalues of S1 S2) on features, in float64."""
    s1, s2 = fid_features_to_statistics(f1.double()), fid_features_to_statistics(f2.double())
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def kid(f1: Tensor, f2: Tensor, *, subsets: int = 100, seed: int = 0) -> float:
    """torch-fidelity's KID: the mean unbiased MMD^2 (cubic kernel) over ``subsets`` random subsets
    of min(n1, n2, 1000) samples from each set."""
    return float(
        kid_features_to_metric(
            f1.double(),
            f2.double(),
            kid_subsets=subsets,
            kid_subset_size=min(len(f1), len(f2), 1000),
            rng_seed=seed,
            verbose=False,
        )[KEY_METRIC_KID_MEAN]
    )


def precision_recall(
    generated: Tensor, reference: Tensor, *, neighborhood: int = 3
) -> dict[str, float]:
    """torch-fidelity's improved precision/recall (Kynkaanniemi et al. 2019): precision is the share
    of generated samples inside some reference sample's k-NN ball, recall the converse."""
    out = prc_features_to_metric(
        generated.double(), reference.double(), prc_neighborhood=neighborhood, verbose=False
    )
    return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Intervals.


def half_sample_interval(
    metric: Callable[[Tensor, Tensor], float],
    generated: Tensor,
    reference: Tensor,
    *,
    draws: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A normal interval around ``metric(generated, reference)`` whose width comes from random
    half-samples of both sets (drawn without replacement).

    A half-sample statistic has about twice the variance of the full one, so the full-size
    standard error is the half-sample spread over sqrt(2). Resampling with replacement (the plain
    bootstrap) would instead duplicate samples, which biases FID and KID upwards: its percentile
    interval can miss the estimate altogether.
    """
    g = torch.Generator().manual_seed(seed)
    m, n = len(generated) // 2, len(reference) // 2
    values = torch.tensor(
        [
            metric(
                generated[torch.randperm(len(generated), generator=g)[:m]],
                reference[torch.randperm(len(reference), generator=g)[:n]],
            )
            for _ in range(draws)
        ],
        dtype=torch.float64,
    )
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))
    half_width = z * float(values.std()) / 2**0.5
    centre = metric(generated, reference)
    return centre - half_width, centre + half_width


def paired_fid_gap(
    generated: Tensor,
    baseline: Tensor,
    reference: Tensor,
    *,
    draws: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """FID(generated, reference) - FID(baseline, reference) and its half-sample interval, paired:
    row i of ``generated`` and ``baseline`` must come from the same seed (common random numbers),
    and every draw takes the same rows of both and the same reference half, so the noise the two
    share (the reference draw, the seeds) cancels in the difference."""
    if generated.shape != baseline.shape:
        raise ValueError(
            f"paired sets must have the same shape, got {tuple(generated.shape)} and "
            f"{tuple(baseline.shape)}"
        )
    d = generated.shape[1]

    def gap(both: Tensor, ref: Tensor) -> float:
        return fid(both[:, :d], ref) - fid(both[:, d:], ref)

    both = torch.cat([generated, baseline], dim=1)  # (N, 2d): rows stay paired in every draw
    low, high = half_sample_interval(gap, both, reference, draws=draws, level=level, seed=seed)
    return gap(both, reference), low, high


def floor_draws(
    generated: Tensor, reference: Tensor, *, draws: int = 50, seed: int = 0
) -> dict[str, float]:
    """Generated features against the real-vs-real floor at the same count, over many draws.

    Each draw splits ``reference`` into two disjoint random halves A and B of h = min(len(reference)
    // 2, len(generated)) and takes h random generated samples G: FID(G, A) beside the floor
    FID(B, A), and precision/recall of G against A beside those of B against A. One split is
    noisy (with 297 references FID's floor moves by about a third from split to split); the means
    over draws compare generated and real at equal counts. ``*_std`` is the spread of one draw;
    ``fid_gap`` the mean of the paired difference FID(G, A) - FID(B, A).
    """
    h = min(len(reference) // 2, len(generated))
    if h < MIN_IMAGES:
        raise ValueError(f"{len(reference)} reference images: too few to split for the floor")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(draws):
        perm = torch.randperm(len(reference), generator=g)
        ref_a, ref_b = reference[perm[:h]], reference[perm[h : 2 * h]]
        gen = generated[torch.randperm(len(generated), generator=g)[:h]]
        pr, pr_floor = precision_recall(gen, ref_a), precision_recall(ref_b, ref_a)
        rows.append(
            [
                fid(gen, ref_a),
                fid(ref_b, ref_a),
                pr["precision"],
                pr_floor["precision"],
                pr["recall"],
                pr_floor["recall"],
            ]
        )
    table = torch.tensor(rows, dtype=torch.float64)  # (draws, 6)
    mean, std = table.mean(0).tolist(), table.std(0).tolist()
    gap = table[:, 0] - table[:, 1]
    names = ["fid", "fid_floor", "precision", "precision_floor", "recall", "recall_floor"]
    out = {f"{k}_h": m for k, m in zip(names, mean, strict=True)}
    out |= {f"{k}_h_std": sd for k, sd in zip(names, std, strict=True)}
    return out | {"fid_gap": float(gap.mean()), "fid_gap_std": float(gap.std()), "h": float(h)}


# ----------------------------------------------------------------------------------------------
# One evaluation.


@dataclass(frozen=True)
class FidelityResult:
    """torch-fidelity's numbers and the features it extracted, by layer."""

    raw: dict[str, float]
    generated: dict[str, Tensor]
    reference: dict[str, Tensor]


def calculate(
    generated: Tensor,
    reference: Tensor,
    extractor: Extractor,
    *,
    cuda: bool = False,
    batch_size: int = 64,
    seed: int = 0,
) -> FidelityResult:
    """``torch_fidelity.calculate_metrics`` (IS on ``generated``; FID, KID and precision/recall of
    ``generated`` against ``reference``) on uint8 images, and the features it extracted.

    The features are read back from torch-fidelity's feature cache, kept in a temporary directory
    for this call only (its cache keys carry no content hash, so a shared cache could serve stale
    features). The Inception Score uses one split of all samples.
    """
    if min(len(generated), len(reference)) < MIN_IMAGES:
        raise ValueError(
            f"need >= {MIN_IMAGES} images per side (precision/recall uses each sample's 3rd "
            f"nearest neighbour), got {len(generated)} and {len(reference)}"
        )
    with tempfile.TemporaryDirectory() as cache:
        raw = torch_fidelity.calculate_metrics(
            input1=UInt8Images(generated, rgb=extractor.rgb),
            input2=UInt8Images(reference, rgb=extractor.rgb),
            cuda=cuda,
            batch_size=batch_size,
            isc=True,
            fid=True,
            kid=True,
            prc=True,
            feature_extractor=extractor.name,
            feature_extractor_weights_path=str(extractor.weights_path),
            isc_splits=1,
            kid_subset_size=min(len(generated), len(reference), 1000),
            cache=True,
            cache_root=cache,
            input1_cache_name="generated",
            input2_cache_name="reference",
            save_cpu_ram=True,
            rng_seed=seed,
            verbose=False,
        )
        cls = FEATURE_EXTRACTORS_REGISTRY[extractor.name]
        layers = {cls.get_default_feature_layer_for_metric(m) for m in ("isc", "fid")}
        sides = {}
        for side in ("generated", "reference"):
            sides[side] = {
                layer: torch.load(Path(cache) / f"{side}-{extractor.name}-features-{layer}.pt")
                for layer in layers
            }
    return FidelityResult(
        {k: float(v) for k, v in raw.items()}, sides["generated"], sides["reference"]
    )


def _around(centre: float, interval: tuple[float, float]) -> tuple[float, float]:
    """The interval's half-width around torch-fidelity's own estimate (the half-sample centre is
    the same statistic computed in float64, or one KID subset rather than the mean of 100)."""
    half_width = (interval[1] - interval[0]) / 2
    return centre - half_width, centre + half_width


def score(
    generated: Tensor,
    reference: Tensor,
    extractor: Extractor,
    *,
    cuda: bool = False,
    batch_size: int = 64,
    draws: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Every number of one evaluation: torch-fidelity's FID, KID, IS and precision/recall, with
    intervals for FID and KID, and the real-vs-real floor.

    Intervals: the half-sample scheme of ``metrics.half_sample_interval`` (normal interval whose
    width comes from random halves of both sets drawn without replacement), not the plain
    bootstrap: resampling with replacement duplicates samples, which biases FID and KID upwards,
    so a percentile bootstrap interval can miss the estimate altogether.

    The floor: the reference set split in two disjoint halves, compared with each other at the
    same sample count h = min(generated, reference // 2) as ``fid_half`` (and ``kid_half``), the
    generated set's first h samples against the first half. ``fid_half_over_floor`` is the fair
    ratio; KID's floor is near zero, so it is compared as a difference.
    """
    tf = calculate(generated, reference, extractor, cuda=cuda, batch_size=batch_size, seed=seed)
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor.name]
    layer = cls.get_default_feature_layer_for_metric("fid")
    g, r = tf.generated[layer], tf.reference[layer]
    kid_one = partial(kid, subsets=1, seed=seed)
    fid_c, kid_c = tf.raw["frechet_inception_distance"], tf.raw["kernel_inception_distance_mean"]
    fid_lo, fid_hi = _around(
        fid_c, half_sample_interval(fid, g, r, draws=draws, level=level, seed=seed)
    )
    kid_lo, kid_hi = _around(
        kid_c, half_sample_interval(kid_one, g, r, draws=draws, level=level, seed=seed)
    )
    # The floor: two disjoint halves of the reference, at the generated half's sample count.
    h = min(len(g), len(r) // 2)
    if h < MIN_IMAGES:
        raise ValueError(f"{len(r)} reference images: too few to split for the real-vs-real floor")
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
    ref_a, ref_b = r[perm[:h]], r[perm[h : 2 * h]]
    floor, fid_half = fid(ref_a, ref_b), fid(g[:h], ref_a)
    pr_floor = precision_recall(ref_b, ref_a)
    return {
        "fid": fid_c,
        "fid_low": fid_lo,
        "fid_high": fid_hi,
        "fid_half": fid_half,
        "fid_floor_half": floor,
        "fid_half_over_floor": fid_half / floor if floor > 0 else float("inf"),
        "kid": kid_c,
        "kid_low": kid_lo,
        "kid_high": kid_hi,
        "kid_half": kid(g[:h], ref_a, seed=seed),
        "kid_floor_half": kid(ref_a, ref_b, seed=seed),
        "inception_score": tf.raw["inception_score_mean"],
        "precision": tf.raw["precision"],
        "recall": tf.raw["recall"],
        "f_score": tf.raw["f_score"],
        "precision_floor_half": pr_floor["precision"],
        "recall_floor_half": pr_floor["recall"],
        "num_samples": float(len(g)),
        "num_reference": float(len(r)),
        "num_half": float(h),
    }
