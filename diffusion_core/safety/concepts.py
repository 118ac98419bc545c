"""Concept detection with open_clip, and the calibration of its per-concept thresholds.

The idea of the Stable Diffusion safety checker (image embeddings compared with the embeddings
of unwanted concepts), made transparent: the concepts, their text prompts and their thresholds
are plain configuration, and every score reaches the audit log. A concept's score for an image
is the largest cosine similarity between the image's CLIP embedding and the text embeddings of
the concept's prompts; the image is flagged when the score reaches the concept's threshold.

Thresholds are chosen by ``diffusion_core.safety.calibrate`` on a labelled folder (``safe/`` and
``unsafe/<concept>/``) for a target false-negative rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusion_core.safety.detector import DetectorResult, SafetyContext
from diffusion_core.text import ClipError, ClipModel, load_clip


@dataclass(frozen=True)
class Concept:
    """An unwanted concept: its name (the score's key), text prompts and threshold."""

    name: str
    prompts: tuple[str, ...]
    threshold: float


def _concept(entry: object, position: int) -> Concept:
    where = f"concept: concepts[{position}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping with name, prompts, threshold; got {entry!r}")
    unknown = set(entry) - {"name", "prompts", "threshold"}
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown)} (allowed: name, prompts, threshold)"
        )
    name, prompts, threshold = entry.get("name"), entry.get("prompts"), entry.get("threshold")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not (isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"{where}.prompts must be a string or a list of strings, got {prompts!r}")
    if not (
        isinstance(threshold, int | float)
        and not isinstance(threshold, bool)
        and -1.0 <= threshold <= 1.0
    ):
        raise ValueError(
            f"{where}.threshold must be a cosine similarity in [-1, 1], got {threshold!r}"
        )
    return Concept(name, tuple(prompts), float(threshold))


class ConceptDetector:
    """Flags images whose CLIP embedding is close to the text embedding of a configured concept.

    ``model``: an open_clip model name or JSON config (see :mod:`diffusion_core.text`);
    ``pretrained``: the weights (a file or fsspec URL, checked against ``sha256`` when given).
    Weights are required: without them the scores mean nothing, so a missing ``pretrained`` is
    a configuration error unless ``random_weights: true`` says a random model is intended
    (tests, throughput measurements). ``concepts``: a list of ``{name, prompts, threshold}``.

    Scores: one per concept, the cosine similarity (higher is worse); thresholds: the
    concepts'. The reason names every concept an image reached.
    """

    name = "concept"

    def __init__(
        self,
        *,
        model: str,
        concepts: Sequence[Mapping[str, Any]],
        pretrained: str | None = None,
        sha256: str | None = None,
        random_weights: bool = False,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        if isinstance(concepts, str | bytes) or not isinstance(concepts, Sequence) or not concepts:
            raise ValueError(
                "concept: concepts must be a non-empty list of {name, prompts, threshold}"
            )
        self.concepts = [_concept(entry, i) for i, entry in enumerate(concepts)]
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"concept: concept names must be unique, got {names}")
        if pretrained is None and not random_weights:
            raise ClipError(
                f"concept: no CLIP weights configured for {model!r} (set params.pretrained to a "
                "weights file or URL; random_weights: true only for tests and benchmarks)"
            )
        if batch_size < 1:
            raise ValueError(f"concept: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.clip: ClipModel = load_clip(model, pretrained, sha256=sha256).to(device)
        self._text = [self.clip.text_features(list(c.prompts)) for c in self.concepts]

    def scores(self, images: Tensor) -> dict[str, Tensor]:
        """Per concept, the largest cosine similarity of each image to the concept's prompts."""
        feats = self.clip.image_features(images, batch_size=self.batch_size)  # (N, D)
        return {
            c.name: (feats @ text.T).max(dim=1).values.float()
            for c, text in zip(self.concepts, self._text, strict=True)
        }

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        scores = self.scores(images)
        flagged = torch.zeros(images.shape[0], dtype=torch.bool)
        hits: list[list[str]] = [[] for _ in range(images.shape[0])]
        for c in self.concepts:
            over = scores[c.name] >= c.threshold
            flagged |= over
            for i in torch.nonzero(over).flatten().tolist():
                hits[i].append(f"{c.name} {float(scores[c.name][i]):.3f} >= {c.threshold:.3f}")
        reasons = [("concept " + ", ".join(h)) if h else None for h in hits]
        thresholds = {c.name: c.threshold for c in self.concepts}
        return DetectorResult(scores=scores, flagged=flagged, reasons=reasons, threshold=thresholds)
