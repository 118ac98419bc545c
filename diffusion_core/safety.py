"""Safety filter for generated images: detectors score a batch, ``filter_images`` decides.

A detector is a callable ``(images, context) -> DetectorResult`` with a ``name``: ``images`` is
the batch as generated, uint8 (N, C, H, W) (float model-space pixels in [-1, 1] are accepted
too), ``context`` carries what a detector may compare against (the training images, the
requested labels). Built-in detectors are registered by config name in :data:`DETECTORS` and
built with :func:`build_detectors`.

:func:`filter_images` fails closed: an image is published only if every detector ran, returned
well-formed output and passed it; a detector that raises or returns malformed output
quarantines the whole batch. Images are never modified or substituted; the decision is a mask
plus one audit record per image.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class SafetyError(ValueError):
    """A detector cannot judge the batch it was given (missing context, mismatched shapes)."""


class MalformedResultError(SafetyError):
    """A detector returned output that does not describe the batch (wrong length, NaN)."""


@dataclass(frozen=True)
class SafetyContext:
    """What detectors may compare a batch against.

    ``train_images``: the training set, uint8 (M, C, H, W) with the samples' (C, H, W);
    ``labels``: the class requested for each sample, int64 (N,); ``metadata``: free-form
    (run ids, config), passed through untouched.
    """

    train_images: Tensor | None = None
    labels: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class DetectorResult:
    """One detector's verdict on a batch of N images.

    ``scores``: float (N,), the measured quantity (its meaning and direction are the
    detector's); ``flagged``: bool (N,), True to quarantine; ``reasons``: one entry per image,
    text for flagged images and None otherwise; ``threshold``: the value the scores were compared
    against, for the audit record (None when the detector has no single threshold).
    """

    scores: Tensor
    flagged: Tensor
    reasons: list[str | None]
    threshold: float | None = None


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


# ----------------------------------------------------------------------------- invalid


class InvalidImageDetector:
    """Flags images that are not well-formed pixel data or carry no content.

    Flagged: a batch that is not (N, C, H, W) uint8 or floating point (every image); float images
    with NaN or infinite values; images whose pixel standard deviation, in grey levels on the
    0..255 scale over all C*H*W values, is below ``min_std``: blank, saturated or constant
    images, which is what a sampler that diverged (NaN) produces once quantised to uint8.

    ``min_std=2.0`` grey levels: a flat image has std 0 and a nearly flat one rounded to uint8
    stays below 1, while real images have texture far above it (the scikit-learn digits have a
    per-image std of at least 60 at every size). Scores are the std (0 for images that cannot
    be measured); lower is worse.
    """

    name = "invalid"

    def __init__(self, *, min_std: float = 2.0) -> None:
        if not (math.isfinite(min_std) and min_std >= 0.0):
            raise ValueError(f"invalid: min_std must be a finite number >= 0, got {min_std}")
        self.min_std = float(min_std)

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        n = int(images.shape[0]) if images.ndim >= 1 else 0
        problem = None
        if images.ndim != 4 or 0 in images.shape[1:]:
            problem = f"invalid shape {tuple(images.shape)}, expected (N, C, H, W)"
        elif images.dtype != torch.uint8 and not images.is_floating_point():
            problem = f"invalid dtype {images.dtype}, expected uint8"
        if problem is not None:
            return DetectorResult(
                scores=torch.zeros(n),
                flagged=torch.ones(n, dtype=torch.bool),
                reasons=[problem] * n,
                threshold=self.min_std,
            )

        flat = images.detach().flatten(1)
        bad_values = (~torch.isfinite(flat)).sum(dim=1).cpu()  # always 0 for uint8
        grey = _unit_pixels(torch.nan_to_num(flat, nan=0.0)) * 255.0
        stds = grey.std(dim=1, correction=0).cpu()
        stds[bad_values > 0] = 0.0
        means = grey.mean(dim=1).cpu()
        flagged = (bad_values > 0) | (stds < self.min_std)
        reasons: list[str | None] = []
        for bad, flag, std, mean in zip(
            bad_values.tolist(), flagged.tolist(), stds.tolist(), means.tolist(), strict=True
        ):
            if bad:
                reasons.append(f"non-finite: {bad} NaN/inf pixel values")
            elif flag:
                kind = "blank" if mean < 1.0 else "saturated" if mean > 254.0 else "constant"
                reasons.append(f"{kind}: pixel std {std:.1f} < {self.min_std:g}")
            else:
                reasons.append(None)
        return DetectorResult(scores=stds, flagged=flagged, reasons=reasons, threshold=self.min_std)


# ----------------------------------------------------------------------------- memorisation


def _nearest(
    queries: Tensor,
    train: Tensor,
    *,
    chunk_size: int,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """L2 distance from each row of ``queries`` (Q, D) float32 in [0, 1] to its nearest image
    in ``train`` (M, C, H, W), and that image's index; chunked over both so memory stays at
    ``chunk_size**2`` floats. ``exclude[q]`` is a train index query q may not match (itself).
    """
    q_total = queries.shape[0]
    best = torch.full((q_total,), math.inf, device=queries.device)
    best_idx = torch.zeros(q_total, dtype=torch.long, device=queries.device)
    for q0 in range(0, q_total, chunk_size):
        q = queries[q0 : q0 + chunk_size]
        qbest, qidx = best[q0 : q0 + chunk_size], best_idx[q0 : q0 + chunk_size]
        for t0 in range(0, train.shape[0], chunk_size):
            t = _unit_pixels(train[t0 : t0 + chunk_size]).flatten(1).to(queries.device)
            d = torch.cdist(q, t)
            if exclude is not None:
                own = exclude[q0 : q0 + chunk_size].to(queries.device) - t0
                rows = torch.nonzero((own >= 0) & (own < t.shape[0])).flatten()
                d[rows, own[rows]] = math.inf
            dmin, dargmin = d.min(dim=1)
            better = dmin < qbest
            qbest[better] = dmin[better]
            qidx[better] = dargmin[better] + t0
    return best, best_idx


@dataclass(frozen=True)
class Calibration:
    """How a memorisation threshold was derived from a training set."""

    distinct_images: int  # training images left after removing exact duplicates
    probes: int  # how many of them the median was measured on
    median_nn_distance: float
    threshold: float


class MemorisationDetector:
    """Flags near-copies of training images: L2 distance to the nearest training image.

    Pixels are scaled to [0, 1] and the distance is taken over all C*H*W values in float32
    (``torch.cdist``, in ``chunk_size`` blocks). A sample is flagged when its distance is below
    the threshold; the score is the distance (lower is worse) and the reason names the index of
    the nearest image in ``context.train_images``. This is the L2 near-copy criterion of
    Carlini et al. 2023, "Extracting training data from diffusion models".

    Threshold: ``threshold`` when given (absolute, in the units above); otherwise
    ``relative_threshold`` times the median nearest-neighbour distance between distinct training
    images (exact duplicates are removed first, so a set of repeated images cannot drive it to
    0; the median is measured on ``calibration_size`` of them drawn with ``seed``). Pixel
    distances grow with image size and content; the median gap between two distinct training
    images is the data's own scale, so one rule suits 16x16 digits and 32x32 colour images.
    The result is cached per training tensor.

    ``relative_threshold=0.25``: on the scikit-learn digits (16x16 and 32x32 RGB alike) the
    closest pair of distinct training digits is 0.33 of the median apart and the closest
    held-out digit 0.52, so a quarter stays clear of genuinely different images, while a copy
    perturbed by gaussian noise of up to about 5 grey levels per pixel is still caught.
    """

    name = "memorisation"

    def __init__(
        self,
        *,
        relative_threshold: float = 0.25,
        threshold: float | None = None,
        calibration_size: int = 1024,
        chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        if not (math.isfinite(relative_threshold) and relative_threshold > 0.0):
            raise ValueError(
                f"memorisation: relative_threshold must be a finite number > 0, "
                f"got {relative_threshold}"
            )
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0.0):
            raise ValueError(
                f"memorisation: threshold must be a finite number > 0, got {threshold}"
            )
        if calibration_size < 2:
            raise ValueError(f"memorisation: calibration_size must be >= 2, got {calibration_size}")
        if chunk_size < 1:
            raise ValueError(f"memorisation: chunk_size must be >= 1, got {chunk_size}")
        self.relative_threshold = float(relative_threshold)
        self.threshold = None if threshold is None else float(threshold)
        self.calibration_size = calibration_size
        self.chunk_size = chunk_size
        self.seed = seed
        self._cached: tuple[weakref.ref[Tensor], int, Calibration] | None = None

    def calibrate(self, train_images: Tensor) -> Calibration:
        """The threshold for ``train_images`` and how it was derived (cached per tensor)."""
        _check_batch(train_images, "memorisation: context.train_images")
        if self._cached is not None:
            ref, version, calibration = self._cached
            if ref() is train_images and version == train_images._version:
                return calibration
        distinct = torch.unique(train_images.detach().flatten(1), dim=0)
        m = distinct.shape[0]
        if m < 2:
            raise SafetyError(
                f"memorisation: cannot calibrate from {m} distinct training image(s); "
                f"pass threshold= explicitly"
            )
        distinct = distinct.view(m, *train_images.shape[1:])
        probes = torch.arange(m)
        if m > self.calibration_size:
            gen = torch.Generator().manual_seed(self.seed)
            probes = torch.randperm(m, generator=gen)[: self.calibration_size]
        queries = _unit_pixels(distinct[probes.to(distinct.device)]).flatten(1)
        nn, _ = _nearest(queries, distinct, chunk_size=self.chunk_size, exclude=probes)
        median = float(nn.median())
        calibration = Calibration(
            distinct_images=m,
            probes=int(probes.numel()),
            median_nn_distance=median,
            threshold=self.relative_threshold * median,
        )
        self._cached = (weakref.ref(train_images), train_images._version, calibration)
        return calibration

    def threshold_for(self, train_images: Tensor) -> float:
        if self.threshold is not None:
            return self.threshold
        return self.calibrate(train_images).threshold

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
        threshold = self.threshold_for(train)
        flat = images.detach().flatten(1)
        finite = torch.isfinite(flat).all(dim=1).cpu()  # always True for uint8
        dist, idx = _nearest(
            _unit_pixels(torch.nan_to_num(flat)), train, chunk_size=self.chunk_size
        )
        dist, idx = dist.cpu(), idx.cpu()
        dist[~finite] = 0.0  # no distance for NaN/inf pixels: worst score, flagged
        flagged = dist < threshold
        reasons: list[str | None] = []
        for ok, flag, d, j in zip(
            finite.tolist(), flagged.tolist(), dist.tolist(), idx.tolist(), strict=True
        ):
            if not ok:
                reasons.append("non-finite pixel values: nearest-neighbour distance undefined")
            elif flag:
                reasons.append(f"near-copy of training image {j}: L2 {d:.3f} < {threshold:.3f}")
            else:
                reasons.append(None)
        return DetectorResult(scores=dist, flagged=flagged, reasons=reasons, threshold=threshold)


# ----------------------------------------------------------------------------- registry

DETECTORS: dict[str, type[Detector]] = {
    InvalidImageDetector.name: InvalidImageDetector,
    MemorisationDetector.name: MemorisationDetector,
}


def build_detectors(
    names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Detector]:
    """Detectors for the config ``names``, in order, each built with ``options[name]``.

    ValueError names unknown or repeated detectors (listing the allowed ones) and options a
    detector does not accept; options for a known detector that is not enabled are ignored.
    """
    options = options or {}
    allowed = ", ".join(DETECTORS)
    unknown = [n for n in [*names, *options] if n not in DETECTORS]
    if unknown:
        raise ValueError(
            f"unknown safety detector(s): {', '.join(map(repr, dict.fromkeys(unknown)))} "
            f"(allowed: {allowed})"
        )
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"safety detector(s) listed more than once: {', '.join(repeated)}")
    detectors = []
    for name in names:
        kwargs = dict(options.get(name, {}))
        try:
            detectors.append(DETECTORS[name](**kwargs))
        except TypeError as exc:
            raise ValueError(f"safety detector {name!r}: bad options {kwargs}: {exc}") from None
    return detectors


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


def _validated(result: object, n: int) -> DetectorResult:
    """``result`` if it describes a batch of ``n`` images; MalformedResultError otherwise."""
    if not isinstance(result, DetectorResult):
        raise MalformedResultError(f"returned {type(result).__name__}, not DetectorResult")
    scores, flagged, reasons = result.scores, result.flagged, result.reasons
    if not isinstance(scores, Tensor) or scores.shape != (n,) or scores.is_complex():
        raise MalformedResultError(f"scores must be a real tensor of shape ({n},)")
    if bool(torch.isnan(scores.to(torch.float64)).any()):
        raise MalformedResultError("scores contain NaN")
    if not isinstance(flagged, Tensor) or flagged.dtype != torch.bool or flagged.shape != (n,):
        raise MalformedResultError(f"flagged must be a bool tensor of shape ({n},)")
    if not isinstance(reasons, list) or len(reasons) != n:
        raise MalformedResultError(f"reasons must be a list of {n} entries")
    if any(r is not None and not isinstance(r, str) for r in reasons):
        raise MalformedResultError("reasons must be str or None")
    threshold = result.threshold
    if threshold is not None and not (
        isinstance(threshold, int | float) and not math.isnan(threshold)
    ):
        raise MalformedResultError(f"threshold must be a number or None, got {threshold!r}")
    return result


def filter_images(
    images: Tensor, context: SafetyContext, detectors: Sequence[Detector]
) -> SafetyDecision:
    """Run every detector on the batch and decide, per image, publish or quarantine.

    Fail-closed: an image is published only if every detector ran and passed it. A detector
    that raises, or returns output that does not describe the batch, quarantines every image
    with reason ``"detector <name> failed: <error>"``; the other detectors still run so their
    scores reach the audit records. ``images`` is never modified.
    """
    if not isinstance(images, Tensor) or images.ndim == 0:
        raise SafetyError("images must be a tensor with a batch dimension (N, C, H, W)")
    if not detectors:
        raise ValueError("no safety detectors given; at least one is required")
    names = [_detector_name(d) for d in detectors]
    if len(set(names)) != len(names):
        raise ValueError(f"safety detector names must be unique, got {names}")
    n = int(images.shape[0])

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
    scores = {
        name: r.scores.detach().cpu().to(torch.float64).tolist() for name, r in results.items()
    }
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
                "decision": "publish" if publish else "quarantine",
                "scores": {name: scores[name][i] if name in scores else None for name in names},
                "thresholds": dict(thresholds),
                "flagged_by": flagged_by + list(failures),
                "reasons": reasons,
            }
        )
    return SafetyDecision(published=published, records=records, flagged=flagged, failures=failures)


def _plain(value: float | None) -> float | None:
    return None if value is None else float(value)
