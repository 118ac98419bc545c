"""Concept detection with open_clip, and the calibration of its per-concept thresholds.

The idea of the Stable Diffusion safety checker (image embeddings compared with the embeddings
of unwanted concepts), made transparent: the concepts, their text prompts and their thresholds
are plain configuration, and every score reaches the audit log. A concept's score for an image
is the largest cosine similarity between the image's CLIP embedding and the text embeddings of
the concept's prompts; the image is flagged when the score reaches the concept's threshold.

Thresholds are chosen by :func:`calibrate_concepts` on a labelled folder (``safe/`` and
``unsafe/<concept>/``) for a target false-negative rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_core.clip import ClipError, ClipModel, load_clip
from diffusion_core.images import read_image
from diffusion_core.safety import DetectorResult, SafetyContext

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


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

    ``model``: an open_clip model name or JSON config (see :mod:`diffusion_core.clip`);
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
        self.clip: ClipModel = load_clip(model, pretrained, sha256=sha256)
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


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ConceptCalibration:
    """A calibrated threshold and its error rates on the calibration set."""

    concept: str
    threshold: float
    target_fnr: float
    fnr: float  # unsafe images of this concept scoring below the threshold
    fpr: float  # safe images scoring at or above it
    num_unsafe: int
    num_safe: int


def threshold_for_fnr(unsafe_scores: Tensor, target_fnr: float) -> float:
    """The largest threshold that misses at most ``target_fnr`` of ``unsafe_scores``.

    Images are flagged when score >= threshold, so the misses are the scores below it: with the
    scores sorted, s[k] for k = floor(target_fnr * n) leaves at most k of the n below.
    """
    if not 0.0 <= target_fnr < 1.0:
        raise ValueError(f"target FNR must be in [0, 1), got {target_fnr}")
    n = int(unsafe_scores.numel())
    if n == 0:
        raise ValueError("no unsafe images to calibrate on")
    ordered = unsafe_scores.flatten().double().sort().values
    k = math.floor(target_fnr * n + 1e-9)
    return float(ordered[k])


def calibrate_concepts(
    detector: ConceptDetector,
    safe: Tensor,
    unsafe: Mapping[str, Tensor],
    *,
    target_fnr: float,
) -> dict[str, ConceptCalibration]:
    """Per configured concept, the threshold for ``target_fnr`` on ``unsafe[concept]`` and the
    rates it gives on the calibration set (FPR on ``safe``)."""
    configured = [c.name for c in detector.concepts]
    unknown = sorted(set(unsafe) - set(configured))
    missing = [c for c in configured if c not in unsafe]
    if unknown:
        raise ValueError(
            f"labelled images for unconfigured concept(s) {unknown} (configured: {configured})"
        )
    if missing:
        raise ValueError(f"no labelled unsafe images for configured concept(s) {missing}")
    if safe.shape[0] == 0:
        raise ValueError("no safe images to measure the false-positive rate on")
    safe_scores = detector.scores(safe)
    out = {}
    for name in configured:
        scores = detector.scores(unsafe[name])[name]
        threshold = threshold_for_fnr(scores, target_fnr)
        out[name] = ConceptCalibration(
            concept=name,
            threshold=threshold,
            target_fnr=target_fnr,
            fnr=float((scores < threshold).double().mean()),
            fpr=float((safe_scores[name] >= threshold).double().mean()),
            num_unsafe=int(scores.numel()),
            num_safe=int(safe.shape[0]),
        )
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_folder(folder: Path, size: int) -> Tensor:
    files = _image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return torch.stack([read_image(p, size=size, channels=3) for p in files])


def read_labelled_folder(root: str | Path, *, size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``root/safe/*`` and ``root/unsafe/<concept>/*`` as uint8 (N, 3, size, size) tensors."""
    root = Path(root)
    safe_dir, unsafe_dir = root / "safe", root / "unsafe"
    for folder in (safe_dir, unsafe_dir):
        if not folder.is_dir():
            raise ValueError(f"{root}: expected folders safe/ and unsafe/<concept>/, no {folder}")
    concepts = sorted(p for p in unsafe_dir.iterdir() if p.is_dir())
    if not concepts:
        raise ValueError(f"{unsafe_dir}: no concept folders")
    return _read_folder(safe_dir, size), {p.name: _read_folder(p, size) for p in concepts}


def _concept_spec(data: dict[str, Any], source: str, detector: str) -> dict[str, Any]:
    """The raw ``safety.detectors`` entry named ``detector`` in a config mapping."""
    entries = (data.get("safety") or {}).get("detectors") or []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == detector:
            return entry
    raise ValueError(f"{source}: no detector named {detector!r} under safety.detectors")


def calibrate_config(
    config_path: str | Path,
    data_dir: str | Path,
    out_path: str | Path,
    *,
    target_fnr: float = 0.05,
    detector: str = "concept",
) -> dict[str, ConceptCalibration]:
    """Calibrate the concept thresholds of the run config at ``config_path`` on the labelled
    folder ``data_dir`` and write the config, with the new thresholds, to ``out_path``.

    The written YAML starts with comments giving each concept's threshold and its measured
    FNR/FPR on the calibration set; the same figures go to ``<out_path>.calibration.json``.
    Both files are written to temporary names and renamed into place, and the new config is
    validated first, so a failure leaves no half-written output.
    """
    import json
    import os
    import tempfile

    import yaml

    from diffusion_core.config import load_config, parse_config

    config_path, out_path = Path(config_path), Path(out_path)
    load_config(config_path)  # the input must be a valid run config
    data = yaml.safe_load(config_path.read_text()) or {}
    spec = _concept_spec(data, str(config_path), detector)
    concept_detector = ConceptDetector(**(spec.get("params") or {}))
    safe, unsafe = read_labelled_folder(data_dir, size=concept_detector.clip.image_size)
    results = calibrate_concepts(concept_detector, safe, unsafe, target_fnr=target_fnr)
    for entry in spec["params"]["concepts"]:
        entry["threshold"] = round(results[entry["name"]].threshold, 6)
    parse_config(data, source=str(out_path))

    header = [
        f"# safety.detectors[{detector}] thresholds calibrated by `diffpipe calibrate-safety` on",
        f"# {data_dir} for a target false-negative rate of {target_fnr:g}; on that set:",
        *(
            f"#   {r.concept}: threshold {r.threshold:.6f}, FNR {r.fnr:.4f} "
            f"({r.num_unsafe} unsafe), FPR {r.fpr:.4f} ({r.num_safe} safe)"
            for r in results.values()
        ),
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
    report = {
        "config": str(config_path),
        "data": str(data_dir),
        "detector": detector,
        "target_fnr": target_fnr,
        "concepts": {name: vars(r) for name, r in results.items()},
    }
    sibling = out_path.with_name(out_path.name + ".calibration.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staged = []
    for target, content in ((sibling, json.dumps(report, indent=2) + "\n"), (out_path, text)):
        fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        staged.append((tmp, target))
    for tmp, target in staged:
        os.replace(tmp, target)
    return results
