"""What a safety detector is: a callable ``(images, context) -> DetectorResult`` with a ``name``,
the context it may compare against, and the checks every detector shares."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


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


def unit_pixels(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] pixels as float32 in [0, 1] (floats are clamped)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if images.is_floating_point():
        return (images.to(torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0
    raise SafetyError(f"images must be uint8 or floating point, got {images.dtype}")


def check_batch(images: Tensor, what: str) -> None:
    if images.ndim != 4 or 0 in images.shape[1:]:
        raise SafetyError(f"{what} must be (N, C, H, W), got shape {tuple(images.shape)}")


def check_finite_number(value: float, what: str, *, low: float, high: float = math.inf) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{what} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def optional_number(
    value: float | None, what: str, *, low: float, high: float = math.inf
) -> float | None:
    return None if value is None else check_finite_number(value, what, low=low, high=high)
