"""The evaluation stage: FID, KID, IS and precision/recall of the published samples against the
holdout split (torch-fidelity, on the configured extractor's features), with intervals, the
real-vs-real floor, conditional accuracy and the modality's own statistics; the metric record says
what the numbers may be compared with."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_core.config import (
    DEFAULT_RUNTIME,
    EvaluationConfig,
    RuntimeConfig,
    SamplingDefaults,
    diffpipe_home,
)
from diffusion_core.distributed import resolve_device
from diffusion_core.evaluation import fidelity, quality
from diffusion_core.evaluation.judge import TrainedClassifier, save_classifier
from diffusion_core.evaluation.promotion import reference_record, sampling_record
from diffusion_core.pipeline.modality import modality
from diffusion_core.pipeline.stages.dataset import DatasetRef, domain_classifier, read_split
from diffusion_core.pipeline.stages.safety import read_published
from diffusion_core.pipeline.store import ArtefactStore


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    record: dict[str, Any]


def evaluation_extractor(
    store: ArtefactStore,
    dataset: DatasetRef,
    ec: EvaluationConfig,
    work_dir: Path,
    device: torch.device | str = "cpu",
) -> tuple[fidelity.Extractor, TrainedClassifier]:
    """The configured feature extractor, and the domain classifier on ``device`` (the judge of
    conditional accuracy whichever extractor computes the features). Fetched Inception weights
    are cached under ``$DIFFPIPE_HOME/cache/weights``."""
    judge, judge_sha = domain_classifier(store, dataset, device)
    if ec.extractor == "inception-v3-compat":
        return fidelity.inception_extractor(ec, diffpipe_home() / "cache" / "weights"), judge
    save_classifier(judge, work_dir)
    return fidelity.Extractor(fidelity.DOMAIN, work_dir, judge_sha), judge


def evaluation_reference(
    extractor: fidelity.Extractor, ec: EvaluationConfig, dataset: DatasetRef, num_reference: int
) -> dict[str, Any]:
    """The metric record's reference part for ``extractor`` against ``dataset``'s holdout."""
    return reference_record(
        engine=fidelity.ENGINE,
        extractor=ec.extractor,
        extractor_sha256=extractor.sha256,
        reference_sha256=dataset.sha256,
        num_reference=num_reference,
    )


def evaluate_samples(
    store: ArtefactStore,
    safety_prefix: str,
    dataset: DatasetRef,
    *,
    knobs: SamplingDefaults,
    nfe: int,
    seed: int,
    out_key: str,
    evaluation: EvaluationConfig,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    safety_rates: Mapping[str, float] | None = None,
) -> Evaluation:
    """Every number of one evaluation of the published samples (drawn with ``knobs`` at ``nfe``
    network evaluations from ``seed``), committed as ``out_key``. Features are extracted on
    ``runtime.device``. ``safety_rates`` (``SafetyRef.rates``) join the metrics, for the
    promotion guardrails."""
    ec = evaluation
    device = resolve_device(runtime.device)
    published = read_published(store, safety_prefix)
    holdout = read_split(store, dataset, "holdout")
    n = min(len(published["images"]), ec.num_samples or len(published["images"]))
    if n < fidelity.MIN_IMAGES:
        raise ValueError(
            f"{safety_prefix}: {n} published samples, too few to evaluate "
            f"(at least {fidelity.MIN_IMAGES})"
        )
    images = published["images"][:n]
    labels = published["labels"][:n] if "labels" in published else None
    with tempfile.TemporaryDirectory() as tmp:
        extractor, judge = evaluation_extractor(store, dataset, ec, Path(tmp), device)
        metrics = quality.score(
            images,
            holdout.images,
            extractor,
            device=device,
            batch_size=ec.batch_size,
            draws=ec.interval_draws,
            level=ec.interval_level,
            seed=seed,
            labels=None if labels is None or holdout.labels is None else (labels, holdout.labels),
        )
    if not dataset.class_names and ec.extractor == "domain":
        del metrics["inception_score"]  # the judge's classes are turns, not kinds of image
    metrics["judge_holdout_accuracy"] = judge.holdout_accuracy
    if labels is not None:
        metrics["conditional_accuracy"] = judge.accuracy(images, labels)
        metrics["accuracy_gap"] = judge.holdout_accuracy - metrics["conditional_accuracy"]
    metrics |= modality(dataset.dims).extra_metrics(images, labels, holdout, judge)
    metrics |= dict(safety_rates or {})
    seeds = published["seeds"][:n]
    record = {
        **evaluation_reference(extractor, ec, dataset, len(holdout)),
        "num_samples": n,
        **sampling_record(knobs.model_dump(), nfe=nfe, seed=seed),
        "seeds": f"{int(seeds.min())}..{int(seeds.max())}",  # per-sample noise seeds
        "device": str(device),  # where the features were extracted (not compared)
    }
    store.write_json(out_key, {"metrics": metrics, "record": record})
    return Evaluation(metrics, record)
