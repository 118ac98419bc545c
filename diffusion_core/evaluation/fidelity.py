"""Sample quality through torch-fidelity: its FID, KID, Inception Score and precision/recall,
with intervals and the real-vs-real floor around them. One path for images and volumes: a volume
set goes through the same calls, on the features of its own 3-D judge.

Only torch-fidelity's documented API is used: ``calculate_metrics``, ``register_feature_extractor``
and ``FeatureExtractorBase``, ``FeatureExtractorInceptionV3`` and the metric keys. An evaluation
runs its extractor once over each image set (:func:`extract`); every number is then
``calculate_metrics`` over those features, through ``diffpipe-features``, a registered extractor
that hands torch-fidelity the precomputed feature rows as they are (in float64). So the intervals
and the floor, which need the metrics on many subsets, never extract features again.

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

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch_fidelity import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_FID,
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    FeatureExtractorBase,
    FeatureExtractorInceptionV3,
)

from diffusion_core.config import EvaluationConfig
from diffusion_core.evaluation.judge import load_classifier
from diffusion_core.io import WeightsError, fetch_weights

DOMAIN = "diffpipe-domain"  # torch-fidelity's registry name of the domain classifier
INCEPTION = "inception-v3-compat"
FEATURES = "diffpipe-features"  # torch-fidelity's registry name of precomputed features
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


class FeatureRows(Dataset[Tensor]):
    """The rows of an (N, D) feature matrix, in float64, as a torch-fidelity input."""

    def __init__(self, features: Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"expected (N, D) features, got {tuple(features.shape)}")
        self.features = features.detach().cpu().double()

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Tensor:
        return self.features[i]


class PrecomputedFeatures(FeatureExtractorBase):  # type: ignore[misc]
    """Features that were already extracted, passed on unchanged: the one layer ``features``
    serves every metric."""

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> None:
        return None

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (x,)


# Registry name -> class, for extracting features ourselves (torch-fidelity registers Inception).
EXTRACTOR_CLASSES: dict[str, type[FeatureExtractorBase]] = {
    DOMAIN: DomainFeatureExtractor,
    INCEPTION: FeatureExtractorInceptionV3,
}


def _register(name: str, cls: type[FeatureExtractorBase]) -> None:
    with contextlib.suppress(ValueError):  # already registered: this module was loaded again
        torch_fidelity.register_feature_extractor(name, cls)


_register(DOMAIN, DomainFeatureExtractor)
_register(FEATURES, PrecomputedFeatures)


@dataclass(frozen=True)
class Extractor:
    """A feature extractor ready for torch-fidelity: registry name, local weights, their sha256."""

    name: str
    weights_path: Path
    sha256: str

    @property
    def rgb(self) -> bool:
        return self.name == INCEPTION

    def layer(self, metric: str) -> str:
        """The extractor's layer for ``metric`` (``isc``, ``fid``, ``kid`` or ``prc``)."""
        return str(EXTRACTOR_CLASSES[self.name].get_default_feature_layer_for_metric(metric))


def inception_extractor(ec: EvaluationConfig, cache_dir: Path) -> Extractor:
    """The configured Inception weights, fetched and verified."""
    if ec.weights is None:
        raise WeightsError("evaluation.weights is required for inception-v3-compat")
    path, sha = fetch_weights(
        ec.weights, cache_dir, expected_sha256=ec.weights_sha256, what="evaluation.weights"
    )
    return Extractor(INCEPTION, path, sha)


def extract(
    images: Tensor,
    extractor: Extractor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """The extractor's layers for the Inception Score and FID on uint8 images (or volumes), by
    layer name: one pass of the registered extractor class on ``device``, as torch-fidelity
    would run it; the features come back on the CPU."""
    layers = sorted({extractor.layer("isc"), extractor.layer("fid")})
    cls = EXTRACTOR_CLASSES[extractor.name]
    net = cls(extractor.name, layers, feature_extractor_weights_path=str(extractor.weights_path))
    device = torch.device(device)
    net = net.requires_grad_(False).eval().to(device)
    parts: list[tuple[Tensor, ...]] = []
    with torch.no_grad():
        for batch in DataLoader(UInt8Images(images, rgb=extractor.rgb), batch_size=batch_size):
            parts.append(tuple(t.cpu() for t in net(batch.to(device))))
    return {layer: torch.cat([p[i] for p in parts]) for i, layer in enumerate(layers)}


# ----------------------------------------------------------------------------------------------
# Metrics on features (torch-fidelity's implementations).


def _metrics(first: Tensor, second: Tensor | None, options: dict[str, Any]) -> dict[str, float]:
    """``calculate_metrics`` with ``options`` on precomputed features (one batch, no cache)."""
    out = torch_fidelity.calculate_metrics(
        input1=FeatureRows(first),
        input2=None if second is None else FeatureRows(second),
        feature_extractor=FEATURES,
        batch_size=max(len(first), 0 if second is None else len(second)),
        cuda=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
        **options,
    )
    return {k: float(v) for k, v in out.items()}


def fid(f1: Tensor, f2: Tensor) -> float:
    """torch-fidelity's FID (eigenvalues of S1 S2) on features, in float64."""
    return _metrics(f1, f2, {"fid": True})[KEY_METRIC_FID]


def kid(f1: Tensor, f2: Tensor, *, subsets: int = 100, seed: int = 0) -> float:
    """torch-fidelity's KID: the mean unbiased MMD^2 (cubic kernel) over ``subsets`` random subsets
    of min(n1, n2, 1000) samples from each set."""
    options = {
        "kid": True,
        "kid_subsets": subsets,
        "kid_subset_size": min(len(f1), len(f2), 1000),
        "rng_seed": seed,
    }
    return _metrics(f1, f2, options)[KEY_METRIC_KID_MEAN]


def precision_recall(
    generated: Tensor, reference: Tensor, *, neighborhood: int = 3
) -> dict[str, float]:
    """torch-fidelity's improved precision/recall (Kynkaanniemi et al. 2019): precision is the share
    of generated samples inside some reference sample's k-NN ball, recall the converse."""
    out = _metrics(generated, reference, {"prc": True, "prc_neighborhood": neighborhood})
    keys = {KEY_METRIC_PRECISION: "precision", KEY_METRIC_RECALL: "recall"}
    return {name: out[key] for key, name in (keys | {KEY_METRIC_F_SCORE: "f_score"}).items()}


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
    ``fid_gap`` the mean of the paired difference FID(G, A) - FID(B, A), ``fid_gap_low`` and
    ``fid_gap_high`` its normal 95% interval over the draws (the mean's Monte Carlo error, which
    more draws shrink; it does not cover the draw of the generated set itself).
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
    gap_mean, gap_std = float(gap.mean()), float(gap.std())
    half = 1.96 * gap_std / draws**0.5  # the normal 95% interval of the mean over the draws
    names = ["fid", "fid_floor", "precision", "precision_floor", "recall", "recall_floor"]
    out = {f"{k}_h": m for k, m in zip(names, mean, strict=True)}
    out |= {f"{k}_h_std": sd for k, sd in zip(names, std, strict=True)}
    out |= {"fid_gap": gap_mean, "fid_gap_std": gap_std, "h": float(h)}
    return out | {"fid_gap_low": gap_mean - half, "fid_gap_high": gap_mean + half}


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
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    seed: int = 0,
) -> FidelityResult:
    """torch-fidelity's Inception Score of ``generated`` and its FID, KID and precision/recall of
    ``generated`` against ``reference`` (uint8 images or volumes), with the features behind them.

    The extractor runs once per set (:func:`extract`, on ``device``); ``calculate_metrics`` then
    works on those features. The Inception Score uses one split of all samples; KID uses subsets of
    min(n1, n2, 1000) samples.
    """
    if min(len(generated), len(reference)) < MIN_IMAGES:
        raise ValueError(
            f"need >= {MIN_IMAGES} images per side (precision/recall uses each sample's 3rd "
            f"nearest neighbour), got {len(generated)} and {len(reference)}"
        )
    gen = extract(generated, extractor, device=device, batch_size=batch_size)
    ref = extract(reference, extractor, device=device, batch_size=batch_size)
    layer = extractor.layer("fid")  # also KID's and precision/recall's, for both extractors
    options = {
        "fid": True,
        "kid": True,
        "prc": True,
        "kid_subset_size": min(len(generated), len(reference), 1000),
        "rng_seed": seed,
    }
    raw = _metrics(gen[layer], ref[layer], options)
    isc = {"isc": True, "isc_splits": 1, "rng_seed": seed}
    raw |= _metrics(gen[extractor.layer("isc")], None, isc)
    return FidelityResult(raw, gen, ref)
