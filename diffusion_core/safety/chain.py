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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import Tensor

from diffusion_core.config import DetectorConfig, SafetyConfig
from diffusion_core.safety.concepts import ConceptDetector
from diffusion_core.safety.detector import (
    Detector,
    DetectorResult,
    MalformedResultError,
    SafetyContext,
    SafetyError,
    Scores,
    Thresholds,
)
from diffusion_core.safety.memorisation import MemorisationDetector
from diffusion_core.safety.sanity import InvalidImageDetector

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "diffpipe.detectors"


BUILT_IN: dict[str, Callable[..., Detector]] = {
    InvalidImageDetector.name: InvalidImageDetector,
    MemorisationDetector.name: MemorisationDetector,
    ConceptDetector.name: ConceptDetector,  # open_clip is loaded when one is built
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


# Built-in detectors that run a network, and take the device to run it on.
ON_DEVICE = frozenset({ConceptDetector.name})


def build_detector(spec: DetectorConfig, *, device: str = "cpu") -> Detector:
    """The detector ``spec`` describes: built-in by name, or a plug-in's factory called with
    ``spec.params`` (a built-in network detector also gets ``device``). Raises ValueError
    (unknown name, bad parameters, missing weights)."""
    factory = _factory(spec.name)
    params = {**spec.params, "device": device} if spec.name in ON_DEVICE else spec.params
    try:
        detector = factory(**params)
    except TypeError as exc:
        raise ValueError(f"bad params {spec.params}: {exc}") from None
    if not callable(detector):
        raise ValueError(f"factory returned {type(detector).__name__}, not a callable detector")
    if spec.name in BUILT_IN:
        return detector
    return NamedDetector(spec.name, detector)


def build_chain(config: SafetyConfig, *, device: str = "cpu") -> list[Detector]:
    """The enabled detectors of ``config``, in order (network detectors on ``device``).

    A detector that cannot be built (unknown name, bad parameters, missing weights, a plug-in
    that fails to import) becomes a :class:`FailedDetector` carrying the error: building never
    raises for one bad entry, and the batch it would have judged is quarantined with the reason.
    """
    chain: list[Detector] = []
    for spec in config.detectors:
        if not spec.enabled:
            continue
        try:
            chain.append(build_detector(spec, device=device))
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
