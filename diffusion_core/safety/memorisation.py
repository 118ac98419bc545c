"""The memorisation detector: samples that replicate a training image, in pixel space and in the
dataset's own feature space (Carlini et al. 2023)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_core.safety.detector import (
    DetectorResult,
    SafetyContext,
    SafetyError,
    check_batch,
    check_finite_number,
    optional_number,
    unit_pixels,
)


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
    return unit_pixels(images).flatten(1)  # (B, C*H*W) in [0, 1]


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
        self.relative_threshold = check_finite_number(
            relative_threshold, f"{what} relative_threshold", low=1e-12
        )
        self.threshold = optional_number(threshold, f"{what} threshold", low=1e-12)
        self.ratio_quantile = check_finite_number(
            ratio_quantile, f"{what} ratio_quantile", low=0.0, high=1.0
        )
        self.pixel_ratio_threshold = optional_number(
            pixel_ratio_threshold, f"{what} pixel_ratio_threshold", low=0.0, high=1.0
        )
        self.feature_ratio_threshold = optional_number(
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
        check_batch(train_images, "memorisation: context.train_images")
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
        check_batch(images, "memorisation: images")
        check_batch(train, "memorisation: context.train_images")
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
    return (unit_pixels(images) * 255.0).round().to(torch.uint8)
