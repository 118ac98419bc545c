"""Calibration of the concept detector's thresholds on a labelled folder (``safe/`` and
``unsafe/<concept>/``) for a target false-negative rate, written back into a run config."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from diffusion_core.config import load_config, parse_config
from diffusion_core.io import CONVERT, IMAGE_SUFFIXES, atomic_path, list_images, read_image
from diffusion_core.safety.concepts import ConceptDetector


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


def _read_folder(folder: Path, size: int) -> Tensor:
    files = list_images(folder)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return torch.stack([read_image(p, CONVERT.sized(size, 3)) for p in files])


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
    with atomic_path(sibling) as tmp_report, atomic_path(out_path) as tmp_config:
        tmp_report.write_text(json.dumps(report, indent=2) + "\n")
        tmp_config.write_text(text)
    return results
