"""Safety filter for generated images: a configured chain of detectors scores a batch,
``filter_images`` decides.

A detector is a callable ``(images, context) -> DetectorResult`` with a ``name``: ``images`` is
the batch as generated, uint8 (N, C, H, W) (float model-space pixels in [-1, 1] are accepted
too), ``context`` carries what a detector may compare against (the training images, a feature
extractor, the requested labels). The chain comes from the ``safety:`` config section
(:class:`~diffusion_core.config.SafetyConfig`) through :func:`build_chain`: built-in detectors
by name (:data:`BUILT_IN`: ``sanity``, ``memorisation``, ``concept``) and a user's own through
the ``diffpipe.detectors`` entry point group.

Fail-closed: an image is published only if every enabled detector ran, returned well-formed
output and passed it. A detector that raises, returns malformed output or could not be built
(unknown name, bad parameters, missing weights) quarantines the whole batch with that reason.
Images are never modified or substituted; the decision is a mask plus one audit record per
image.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch
from torch import Tensor

from diffusion_core.config import DetectorConfig, SafetyConfig

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "diffpipe.detectors"


class SafetyError(ValueError):
    """A detector cannot judge the batch it was given (missing context, mismatched shapes)."""


class MalformedResultError(SafetyError):
    """A detector returned output that does not describe the batch (wrong length, NaN)."""


@dataclass(frozen=True)
class SafetyContext:
    """What detectors may compare a batch against.

    ``train_images``: the training set, uint8 (M, C, H, W) with the samples' (C, H, W);
    ``features``: the dataset's own feature extractor (uint8 (B, C, H, W) -> float (B, D), the
    domain classifier's penultimate layer), for comparisons in feature space; ``labels``: the
    class requested for each sample, int64 (N,); ``metadata``: free-form (run ids, config),
    passed through untouched.
    """

    train_images: Tensor | None = None
    labels: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    features: Callable[[Tensor], Tensor] | None = None


Scores = Tensor | dict[str, Tensor]
Thresholds = float | dict[str, float] | None


@dataclass(frozen=True, eq=False)
class DetectorResult:
    """One detector's verdict on a batch of N images.

    ``scores``: float (N,), the measured quantity, or a mapping of named (N,) scores when the
    detector measures several (one per concept, one per space); their meaning and direction are
    the detector's. ``flagged``: bool (N,), True to quarantine; ``reasons``: one entry per
    image, text for flagged images and None otherwise; ``threshold``: the value(s) the scores
    were compared against, for the audit record (a mapping with the same keys as ``scores``, or
    None when the detector has no threshold).
    """

    scores: Scores
    flagged: Tensor
    reasons: list[str | None]
    threshold: Thresholds = None


class Detector(Protocol):
    """Anything with a ``name`` that maps (images, context) to a :class:`DetectorResult`."""

    @property
    def name(self) -> str: ...

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult: ...


# ----------------------------------------------------------------------------- pixel helpers


def _unit_pixels(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] pixels as float32 in [0, 1] (floats are clamped)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if images.is_floating_point():
        return (images.to(torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0
    raise SafetyError(f"images must be uint8 or floating point, got {images.dtype}")


def _check_batch(images: Tensor, what: str) -> None:
    if images.ndim != 4 or 0 in images.shape[1:]:
        raise SafetyError(f"{what} must be (N, C, H, W), got shape {tuple(images.shape)}")


def _check_finite_number(value: float, what: str, *, low: float, high: float = math.inf) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{what} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _optional_number(
    value: float | None, what: str, *, low: float, high: float = math.inf
) -> float | None:
    return None if value is None else _check_finite_number(value, what, low=low, high=high)


# ----------------------------------------------------------------------------- sanity


class InvalidImageDetector:
    """Flags images that are not well-formed pixel data or carry no content (config: ``sanity``).

    Flagged, with the reason named:
    - a batch that is not (N, C, H, W) uint8 or floating point, or whose (C, H, W) differs from
      the training images' (every image: ``shape``/``dtype``);
    - float images with NaN or infinite values (``non-finite``), or values outside the model's
      [-1, 1] range by more than ``range_tolerance`` (``out of range``: a sampler that overshot;
      they would be clipped silently when quantised);
    - images whose pixel standard deviation, in grey levels on the 0..255 scale over all C*H*W
      values, is below ``min_std`` (``blank``, ``saturated`` or ``constant``: what a sampler
      that diverged produces once quantised to uint8);
    - images with more than ``max_clipped_fraction`` of their values at the ends of the range
      (0 or 255; ``saturated``): binary noise, which has a large std but no content.

    ``min_std=2.0`` grey levels: a flat image has std 0 and a nearly flat one rounded to uint8
    stays below 1, while real images have texture far above it (the scikit-learn digits have a
    per-image std of at least 60 at every size). ``max_clipped_fraction=0.95``: digits, whose
    background is black, have at most 62.5% of their pixels at 0 or 255. Scores are the std (0
    for images that cannot be measured); lower is worse.
    """

    name = "sanity"

    def __init__(
        self,
        *,
        min_std: float = 2.0,
        max_clipped_fraction: float = 0.95,
        range_tolerance: float = 1e-3,
    ) -> None:
        self.min_std = _check_finite_number(min_std, "sanity: min_std", low=0.0)
        self.max_clipped_fraction = _check_finite_number(
            max_clipped_fraction, "sanity: max_clipped_fraction", low=0.0, high=1.0
        )
        self.range_tolerance = _check_finite_number(
            range_tolerance, "sanity: range_tolerance", low=0.0
        )

    def _problem(self, images: Tensor, context: SafetyContext) -> str | None:
        """What is wrong with the batch as a whole, if anything."""
        if images.ndim != 4 or 0 in images.shape[1:]:
            return f"invalid shape {tuple(images.shape)}, expected (N, C, H, W)"
        if images.dtype != torch.uint8 and not images.is_floating_point():
            return f"invalid dtype {images.dtype}, expected uint8"
        train = context.train_images
        if train is not None and tuple(train.shape[1:]) != tuple(images.shape[1:]):
            return (
                f"wrong shape: images are {tuple(images.shape[1:])}, training images "
                f"{tuple(train.shape[1:])}"
            )
        return None

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        n = int(images.shape[0]) if images.ndim >= 1 else 0
        problem = self._problem(images, context)
        if problem is not None:
            return DetectorResult(
                scores=torch.zeros(n),
                flagged=torch.ones(n, dtype=torch.bool),
                reasons=[problem] * n,
                threshold=self.min_std,
            )

        flat = images.detach().flatten(1)
        bad_values = (~torch.isfinite(flat)).sum(dim=1).cpu()  # always 0 for uint8
        finite = torch.nan_to_num(flat.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if images.is_floating_point():
            out_of_range = (finite.abs() > 1.0 + self.range_tolerance).sum(dim=1).cpu()
            grey = ((finite.clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # as it would be stored
        else:
            out_of_range = torch.zeros(n, dtype=torch.long)
            grey = finite
        stds = grey.std(dim=1, correction=0).cpu()
        stds[bad_values > 0] = 0.0
        means = grey.mean(dim=1).cpu()
        clipped = ((grey <= 0.0) | (grey >= 255.0)).float().mean(dim=1).cpu()
        reasons: list[str | None] = []
        for bad, over, std, mean, ends in zip(
            bad_values.tolist(),
            out_of_range.tolist(),
            stds.tolist(),
            means.tolist(),
            clipped.tolist(),
            strict=True,
        ):
            if bad:
                reasons.append(f"non-finite: {bad} NaN/inf pixel values")
            elif over:
                reasons.append(f"out of range: {over} values outside [-1, 1]")
            elif std < self.min_std:
                kind = "blank" if mean < 1.0 else "saturated" if mean > 254.0 else "constant"
                reasons.append(f"{kind}: pixel std {std:.1f} < {self.min_std:g}")
            elif ends > self.max_clipped_fraction:
                reasons.append(
                    f"saturated: {ends:.1%} of values at 0 or 255 > {self.max_clipped_fraction:.0%}"
                )
            else:
                reasons.append(None)
        flagged = torch.tensor([r is not None for r in reasons], dtype=torch.bool)
        return DetectorResult(scores=stds, flagged=flagged, reasons=reasons, threshold=self.min_std)


# ----------------------------------------------------------------------------- memorisation


def _two_nearest(
    queries: Tensor,
    train: Tensor,
    prepare: Callable[[Tensor], Tensor],
    *,
    chunk_size: int,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """L2 distances from each row of ``queries`` (Q, D) to its nearest and second-nearest row
    of ``prepare(train)``, and the nearest one's index in ``train``.

    Chunked over both sides, so memory stays at ``chunk_size**2`` distances and ``train``
    (uint8 images, say) is converted one chunk at a time. ``exclude[q]`` is a train index query
    q may not match (itself, for leave-one-out calibration).
    """
    q_total = queries.shape[0]
    first = torch.full((q_total,), math.inf, device=queries.device)
    second = torch.full((q_total,), math.inf, device=queries.device)
    first_idx = torch.zeros(q_total, dtype=torch.long, device=queries.device)
    for q0 in range(0, q_total, chunk_size):
        q = queries[q0 : q0 + chunk_size]
        rows = slice(q0, q0 + q.shape[0])
        for t0 in range(0, train.shape[0], chunk_size):
            t = prepare(train[t0 : t0 + chunk_size]).to(queries.device)
            d = torch.cdist(q, t)  # (q, t)
            if exclude is not None:
                own = exclude[rows].to(queries.device) - t0
                hit = torch.nonzero((own >= 0) & (own < t.shape[0])).flatten()
                d[hit, own[hit]] = math.inf
            # Merge this chunk's two best with the running two best.
            k = min(2, d.shape[1])
            dk, ik = d.topk(k, dim=1, largest=False)
            cand = torch.cat([first[rows, None], second[rows, None], dk], dim=1)
            cand_idx = torch.cat([first_idx[rows, None], first_idx[rows, None], ik + t0], dim=1)
            best, order = cand.topk(2, dim=1, largest=False)
            first[rows], second[rows] = best[:, 0], best[:, 1]
            first_idx[rows] = cand_idx.gather(1, order[:, :1]).squeeze(1)
    return first, second, first_idx


def _pixel_rows(images: Tensor) -> Tensor:
    return _unit_pixels(images).flatten(1)  # (B, C*H*W) in [0, 1]


def _feature_rows(features: Tensor) -> Tensor:
    return features.float()


@dataclass(frozen=True)
class Calibration:
    """How the memorisation thresholds were derived from a training set.

    ``threshold``: the absolute pixel distance below which a sample is a near-copy;
    ``pixel_ratio_threshold`` and ``feature_ratio_threshold`` (None without a feature
    extractor): the nearest/second-nearest distance ratios below which a sample is flagged.
    """

    distinct_images: int  # training images left after removing exact duplicates
    probes: int  # how many of them the leave-one-out statistics were measured on
    median_nn_distance: float
    threshold: float
    pixel_ratio_threshold: float
    feature_ratio_threshold: float | None


@dataclass(frozen=True, eq=False)
class _Reference:
    """The distinct training images, the index of each in the original tensor, their
    features, and the calibration."""

    images: Tensor
    origin: Tensor
    features: Tensor | None
    calibration: Calibration


class MemorisationDetector:
    """Flags samples that replicate a training image, in pixel space and in feature space.

    For each sample the nearest and second-nearest distinct training images are found in two
    spaces: pixels scaled to [0, 1] over all C*H*W values, and the dataset's own feature space
    (``context.features``, the domain classifier's 64-d penultimate layer). A sample is flagged
    when
    - its pixel distance to the nearest training image is below ``threshold`` (an exact or
      lightly perturbed copy), or
    - in either space, the ratio nearest/second-nearest distance is below that space's ratio
      threshold: the sample is much closer to one training image than to any other, the
      memorisation criterion of Carlini et al. 2023, "Extracting training data from diffusion
      models" (Sec. 4: a generation is a copy when it is far closer to one training example
      than to the rest).
    Scores (lower is worse): ``pixel_distance``, ``pixel_ratio``, ``feature_ratio``; the reason
    names the nearest training image (its index in ``context.train_images``).

    Calibration, on the training set itself (exact duplicates removed first, statistics
    measured on ``calibration_size`` distinct images drawn with ``seed``, cached per training
    tensor):
    - pixel ``threshold``: ``relative_threshold`` times the median nearest-neighbour distance
      between distinct training images, unless given. ``relative_threshold=0.25``: on the
      scikit-learn digits (16x16 and 32x32 RGB alike) the closest pair of distinct training
      digits is 0.33 of the median apart and the closest held-out digit 0.52, while a copy
      perturbed by gaussian noise of up to about 5 grey levels per pixel is still caught;
    - ratio thresholds: the ``ratio_quantile`` quantile of the leave-one-out ratios of the
      training images (each against the rest), unless given. A training image left out is a
      fresh image from the data distribution, so a fresh sample from that distribution is
      flagged with probability about ``ratio_quantile`` per space.

    ``feature_space=False`` uses pixels only; otherwise a missing ``context.features`` is an
    error (the batch is quarantined).
    """

    name = "memorisation"

    def __init__(
        self,
        *,
        relative_threshold: float = 0.25,
        threshold: float | None = None,
        ratio_quantile: float = 0.005,
        pixel_ratio_threshold: float | None = None,
        feature_ratio_threshold: float | None = None,
        feature_space: bool = True,
        calibration_size: int = 1024,
        chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        what = "memorisation:"
        self.relative_threshold = _check_finite_number(
            relative_threshold, f"{what} relative_threshold", low=1e-12
        )
        self.threshold = _optional_number(threshold, f"{what} threshold", low=1e-12)
        self.ratio_quantile = _check_finite_number(
            ratio_quantile, f"{what} ratio_quantile", low=0.0, high=1.0
        )
        self.pixel_ratio_threshold = _optional_number(
            pixel_ratio_threshold, f"{what} pixel_ratio_threshold", low=0.0, high=1.0
        )
        self.feature_ratio_threshold = _optional_number(
            feature_ratio_threshold, f"{what} feature_ratio_threshold", low=0.0, high=1.0
        )
        if calibration_size < 2:
            raise ValueError(f"{what} calibration_size must be >= 2, got {calibration_size}")
        if chunk_size < 1:
            raise ValueError(f"{what} chunk_size must be >= 1, got {chunk_size}")
        self.feature_space = bool(feature_space)
        self.calibration_size = calibration_size
        self.chunk_size = chunk_size
        self.seed = seed
        self._cached: tuple[weakref.ref[Tensor], int, object, _Reference] | None = None

    def _reference(
        self, train_images: Tensor, features: Callable[[Tensor], Tensor] | None
    ) -> _Reference:
        """Distinct training images, their features and the calibration (cached per tensor
        and feature extractor; recomputed when the tensor is edited in place)."""
        _check_batch(train_images, "memorisation: context.train_images")
        if self._cached is not None:
            ref, version, extractor, reference = self._cached
            if ref() is train_images and version == train_images._version and extractor == features:
                return reference
        flat = train_images.detach().flatten(1)
        distinct, inverse = torch.unique(flat, dim=0, return_inverse=True)
        m = distinct.shape[0]
        if m < 3:
            raise SafetyError(
                f"memorisation: cannot calibrate from {m} distinct training image(s); "
                "at least 3 are needed"
            )
        distinct = distinct.view(m, *train_images.shape[1:])
        positions = torch.arange(flat.shape[0], device=inverse.device)
        origin = torch.full((m,), flat.shape[0], dtype=torch.long, device=inverse.device)
        origin = origin.scatter_reduce(0, inverse, positions, reduce="amin")
        probes = torch.arange(m)
        if m > self.calibration_size:
            gen = torch.Generator().manual_seed(self.seed)
            probes = torch.randperm(m, generator=gen)[: self.calibration_size]
        probes = probes.to(distinct.device)

        # Leave-one-out in pixel space: each probe against the other distinct images.
        d1, d2, _ = _two_nearest(
            _pixel_rows(distinct[probes]),
            distinct,
            _pixel_rows,
            chunk_size=self.chunk_size,
            exclude=probes,
        )
        median = float(d1.median())
        threshold = (
            self.threshold if self.threshold is not None else self.relative_threshold * median
        )
        pixel_ratio = self.pixel_ratio_threshold
        if pixel_ratio is None:
            pixel_ratio = float(torch.quantile((d1 / d2).double(), self.ratio_quantile))

        train_features = None
        feature_ratio = None
        if self.feature_space:
            if features is None:
                raise SafetyError(
                    "memorisation: context.features (the dataset's feature extractor) is "
                    "required for feature_space: true"
                )
            train_features = _feature_rows(features(distinct))
            f1, f2, _ = _two_nearest(
                train_features[probes],
                train_features,
                _feature_rows,
                chunk_size=self.chunk_size,
                exclude=probes,
            )
            feature_ratio = self.feature_ratio_threshold
            if feature_ratio is None:
                ratios = torch.where(f2 > 0, f1 / f2, torch.ones_like(f1))
                feature_ratio = float(torch.quantile(ratios.double(), self.ratio_quantile))
        calibration = Calibration(
            distinct_images=m,
            probes=int(probes.numel()),
            median_nn_distance=median,
            threshold=threshold,
            pixel_ratio_threshold=pixel_ratio,
            feature_ratio_threshold=feature_ratio,
        )
        reference = _Reference(distinct, origin, train_features, calibration)
        self._cached = (weakref.ref(train_images), train_images._version, features, reference)
        return reference

    def calibrate(
        self, train_images: Tensor, features: Callable[[Tensor], Tensor] | None = None
    ) -> Calibration:
        """The thresholds for ``train_images`` and how they were derived (cached per tensor)."""
        return self._reference(train_images, features).calibration

    def threshold_for(
        self, train_images: Tensor, features: Callable[[Tensor], Tensor] | None = None
    ) -> float:
        """The absolute pixel-distance threshold for ``train_images``."""
        return self.calibrate(train_images, features).threshold

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        train = context.train_images
        if train is None:
            raise SafetyError("memorisation: context.train_images is required")
        _check_batch(images, "memorisation: images")
        _check_batch(train, "memorisation: context.train_images")
        if train.shape[1:] != images.shape[1:]:
            raise SafetyError(
                f"memorisation: samples are {tuple(images.shape[1:])} but training images are "
                f"{tuple(train.shape[1:])}"
            )
        ref = self._reference(train, context.features if self.feature_space else None)
        cal = ref.calibration
        flat = images.detach()
        finite = torch.isfinite(flat.flatten(1)).all(dim=1).cpu()  # always True for uint8
        clean = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
        d1, d2, idx = _two_nearest(
            _pixel_rows(clean), ref.images, _pixel_rows, chunk_size=self.chunk_size
        )
        d1, d2, idx = d1.cpu(), d2.cpu(), ref.origin[idx].cpu()
        pixel_ratio = d1 / d2
        scores = {"pixel_distance": d1, "pixel_ratio": pixel_ratio}
        thresholds = {"pixel_distance": cal.threshold, "pixel_ratio": cal.pixel_ratio_threshold}
        flagged = (d1 < cal.threshold) | (pixel_ratio < cal.pixel_ratio_threshold)
        feature_ratio, feature_nearest = None, idx
        if ref.features is not None and cal.feature_ratio_threshold is not None:
            assert context.features is not None  # the reference was built with it
            queries = _feature_rows(context.features(_as_uint8(clean)))
            f1, f2, fidx = _two_nearest(
                queries, ref.features, _feature_rows, chunk_size=self.chunk_size
            )
            feature_nearest = ref.origin[fidx].cpu()
            feature_ratio = torch.where(f2 > 0, f1 / f2, torch.ones_like(f1)).cpu()
            scores["feature_ratio"] = feature_ratio
            thresholds["feature_ratio"] = cal.feature_ratio_threshold
            flagged |= feature_ratio < cal.feature_ratio_threshold
        for score in scores.values():
            score[~finite] = 0.0  # no distance for NaN/inf pixels: worst score, flagged
        flagged |= ~finite

        reasons: list[str | None] = []
        for i, (ok, flag) in enumerate(zip(finite.tolist(), flagged.tolist(), strict=True)):
            if not ok:
                reasons.append("non-finite pixel values: nearest-neighbour distance undefined")
                continue
            if not flag:
                reasons.append(None)
                continue
            j, parts = int(idx[i]), []
            if d1[i] < cal.threshold:
                parts.append(f"pixel L2 {float(d1[i]):.3f} < {cal.threshold:.3f}")
            if pixel_ratio[i] < cal.pixel_ratio_threshold:
                parts.append(
                    f"pixel NN ratio {float(pixel_ratio[i]):.3f} < {cal.pixel_ratio_threshold:.3f}"
                )
            if feature_ratio is not None and feature_ratio[i] < thresholds["feature_ratio"]:
                parts.append(
                    f"feature NN ratio {float(feature_ratio[i]):.3f} < "
                    f"{thresholds['feature_ratio']:.3f} (nearest in features: "
                    f"training image {int(feature_nearest[i])})"
                )
            reasons.append(f"near-copy of training image {j}: " + ", ".join(parts))
        return DetectorResult(scores=scores, flagged=flagged, reasons=reasons, threshold=thresholds)


def _as_uint8(images: Tensor) -> Tensor:
    """uint8 images unchanged; float model-space [-1, 1] pixels quantised as they are stored."""
    if images.dtype == torch.uint8:
        return images
    return (_unit_pixels(images) * 255.0).round().to(torch.uint8)


# ----------------------------------------------------------------------------- the chain


def _concept_detector(**params: Any) -> Detector:
    from diffusion_core.concepts import ConceptDetector  # loads open_clip only when configured

    return ConceptDetector(**params)


BUILT_IN: dict[str, Callable[..., Detector]] = {
    InvalidImageDetector.name: InvalidImageDetector,
    MemorisationDetector.name: MemorisationDetector,
    "concept": _concept_detector,
}


class FailedDetector:
    """Stands in for a detector that could not be built: judging a batch raises the build
    error, so the chain quarantines the batch with that reason instead of skipping a check."""

    def __init__(self, name: str, error: str) -> None:
        self.name = name
        self.error = error

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        raise SafetyError(self.error)


class NamedDetector:
    """A plug-in detector under its configured name (the name every decision records)."""

    def __init__(self, name: str, detector: Callable[[Tensor, SafetyContext], DetectorResult]):
        self.name = name
        self.detector = detector

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        return self.detector(images, context)


def plugin_names() -> list[str]:
    """Names of the detectors installed in the ``diffpipe.detectors`` entry point group."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def _factory(name: str) -> Callable[..., Any]:
    """The built-in detector class or the plug-in factory registered under ``name``."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise ValueError(
            f"unknown safety detector {name!r} (built in: {', '.join(BUILT_IN)}; installed "
            f"plug-ins in entry point group {ENTRY_POINT_GROUP!r}: "
            f"{', '.join(plugin_names()) or 'none'})"
        )
    if len({ep.value for ep in found}) > 1:
        raise ValueError(
            f"safety detector {name!r} is registered by several plug-ins: "
            f"{', '.join(sorted(ep.value for ep in found))}"
        )
    factory = found[0].load()
    if not callable(factory):
        raise ValueError(f"safety detector {name!r}: entry point {found[0].value} is not callable")
    return factory


def build_detector(spec: DetectorConfig) -> Detector:
    """The detector ``spec`` describes: built-in by name, or a plug-in's factory called with
    ``spec.params``. Raises ValueError (unknown name, bad parameters, missing weights)."""
    factory = _factory(spec.name)
    try:
        detector = factory(**spec.params)
    except TypeError as exc:
        raise ValueError(f"bad params {spec.params}: {exc}") from None
    if not callable(detector):
        raise ValueError(f"factory returned {type(detector).__name__}, not a callable detector")
    if spec.name in BUILT_IN:
        return detector
    return NamedDetector(spec.name, detector)


def build_chain(config: SafetyConfig) -> list[Detector]:
    """The enabled detectors of ``config``, in order.

    A detector that cannot be built (unknown name, bad parameters, missing weights, a plug-in
    that fails to import) becomes a :class:`FailedDetector` carrying the error: building never
    raises for one bad entry, and the batch it would have judged is quarantined with the reason.
    """
    chain: list[Detector] = []
    for spec in config.detectors:
        if not spec.enabled:
            continue
        try:
            chain.append(build_detector(spec))
        except Exception as exc:
            error = f"misconfigured: {exc}"
            logger.error("safety detector %s: %s", spec.name, error)
            chain.append(FailedDetector(spec.name, error))
    return chain


# ----------------------------------------------------------------------------- decision


@dataclass(frozen=True, eq=False)
class SafetyDecision:
    """Which images to publish, and why the others are quarantined.

    ``published``: bool (N,); ``records``: one JSON-ready audit line per image;
    ``flagged``: per detector, bool (N,) of the images it flagged (a detector that failed counts
    as flagging all of them); ``failures``: detector name -> error, for detectors that failed.
    """

    published: Tensor
    records: list[dict[str, Any]]
    flagged: dict[str, Tensor]
    failures: dict[str, str]

    def __len__(self) -> int:
        return int(self.published.shape[0])

    def flag_counts(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.flagged.items()}

    def flag_rates(self) -> dict[str, float]:
        """Fraction of the batch each detector flagged (0.0 for an empty batch)."""
        n = len(self)
        return {name: (count / n if n else 0.0) for name, count in self.flag_counts().items()}

    def counts(self) -> dict[str, int]:
        published = int(self.published.sum())
        return {"images": len(self), "published": published, "quarantined": len(self) - published}


def _detector_name(detector: Detector) -> str:
    name = getattr(detector, "name", None)
    return name if isinstance(name, str) and name else type(detector).__name__


def _validated_scores(scores: object, n: int) -> None:
    named = scores.items() if isinstance(scores, dict) else [("", scores)]
    if isinstance(scores, dict) and not scores:
        raise MalformedResultError("scores is an empty mapping")
    for key, value in named:
        what = f"scores[{key!r}]" if key else "scores"
        if not isinstance(key, str):
            raise MalformedResultError(f"score names must be str, got {key!r}")
        if not isinstance(value, Tensor) or value.shape != (n,) or value.is_complex():
            raise MalformedResultError(f"{what} must be a real tensor of shape ({n},)")
        if bool(torch.isnan(value.to(torch.float64)).any()):
            raise MalformedResultError(f"{what} contain NaN")


def _validated_threshold(threshold: object, scores: object) -> None:
    values = threshold.values() if isinstance(threshold, dict) else [threshold]
    if isinstance(threshold, dict) and not (
        isinstance(scores, dict) and set(threshold) <= set(scores)
    ):
        raise MalformedResultError("threshold mapping must name scores the detector returned")
    for value in values:
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
        ):
            raise MalformedResultError(f"threshold must be a number or None, got {value!r}")


def _validated(result: object, n: int) -> DetectorResult:
    """``result`` if it describes a batch of ``n`` images; MalformedResultError otherwise."""
    if not isinstance(result, DetectorResult):
        raise MalformedResultError(f"returned {type(result).__name__}, not DetectorResult")
    _validated_scores(result.scores, n)
    flagged, reasons = result.flagged, result.reasons
    if not isinstance(flagged, Tensor) or flagged.dtype != torch.bool or flagged.shape != (n,):
        raise MalformedResultError(f"flagged must be a bool tensor of shape ({n},)")
    if not isinstance(reasons, list) or len(reasons) != n:
        raise MalformedResultError(f"reasons must be a list of {n} entries")
    if any(r is not None and not isinstance(r, str) for r in reasons):
        raise MalformedResultError("reasons must be str or None")
    _validated_threshold(result.threshold, result.scores)
    return result


def _score_lists(scores: Scores) -> list[float] | dict[str, list[float]]:
    if isinstance(scores, dict):
        return {k: v.detach().cpu().to(torch.float64).tolist() for k, v in scores.items()}
    return scores.detach().cpu().to(torch.float64).tolist()


def _score_at(scores: list[float] | dict[str, list[float]], i: int) -> float | dict[str, float]:
    if isinstance(scores, dict):
        return {k: v[i] for k, v in scores.items()}
    return scores[i]


def filter_images(
    images: Tensor,
    context: SafetyContext,
    detectors: Sequence[Detector],
    *,
    sample_ids: Sequence[int] | None = None,
) -> SafetyDecision:
    """Run every detector on the batch and decide, per image, publish or quarantine.

    Fail-closed: an image is published only if every detector ran and passed it. A detector
    that raises, or returns output that does not describe the batch, quarantines every image
    with reason ``"detector <name> failed: <error>"``; the other detectors still run so their
    scores reach the audit records. ``images`` is never modified. ``sample_ids`` (default: the
    batch index) name the images in the audit records.
    """
    if not isinstance(images, Tensor) or images.ndim == 0:
        raise SafetyError("images must be a tensor with a batch dimension (N, C, H, W)")
    if not detectors:
        raise ValueError("no safety detectors given; at least one is required")
    names = [_detector_name(d) for d in detectors]
    if len(set(names)) != len(names):
        raise ValueError(f"safety detector names must be unique, got {names}")
    n = int(images.shape[0])
    ids = list(range(n)) if sample_ids is None else [int(i) for i in sample_ids]
    if len(ids) != n:
        raise ValueError(f"sample_ids has {len(ids)} entries for a batch of {n} images")

    results: dict[str, DetectorResult] = {}
    failures: dict[str, str] = {}
    for name, detector in zip(names, detectors, strict=True):
        try:
            results[name] = _validated(detector(images, context), n)
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
            logger.warning("safety detector %s failed; quarantining the batch: %s", name, exc)

    flagged = {
        name: (
            results[name].flagged.detach().cpu()
            if name in results
            else torch.ones(n, dtype=torch.bool)
        )
        for name in names
    }
    published = torch.ones(n, dtype=torch.bool)
    for mask in flagged.values():
        published &= ~mask

    failure_reasons = [f"detector {name} failed: {error}" for name, error in failures.items()]
    scores = {name: _score_lists(r.scores) for name, r in results.items()}
    thresholds = {
        name: (None if name not in results else _plain(results[name].threshold)) for name in names
    }
    flag_lists = {name: flagged[name].tolist() for name in results}
    records = []
    for i, publish in enumerate(published.tolist()):
        reasons = list(failure_reasons)
        flagged_by = []
        for name, result in results.items():
            if flag_lists[name][i]:
                flagged_by.append(name)
                reasons.append(f"{name}: {result.reasons[i] or 'flagged'}")
        records.append(
            {
                "index": i,
                "sample_id": ids[i],
                "decision": "publish" if publish else "quarantine",
                "scores": {
                    name: _score_at(scores[name], i) if name in scores else None for name in names
                },
                "thresholds": dict(thresholds),
                "flagged_by": flagged_by + list(failures),
                "reasons": reasons,
            }
        )
    return SafetyDecision(published=published, records=records, flagged=flagged, failures=failures)


def _plain(value: Thresholds) -> float | dict[str, float] | None:
    if isinstance(value, dict):
        return {k: float(v) for k, v in value.items()}
    return None if value is None else float(value)
