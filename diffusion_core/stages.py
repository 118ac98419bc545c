"""The pipeline's stages as library functions over the artefact store.

Each stage reads its inputs by URL, does its work with the rest of ``diffusion_core`` and commits
its outputs atomically under a prefix; it returns a small summary (URLs, counts, numbers) that an
orchestrator can pass on. Layout under the store's root:

    datasets/<key>/                 train-*.safetensors, holdout-*.safetensors, meta.json
    judges/<dataset sha256>/        the domain classifier (weights.safetensors, meta.json)
    <run>/checkpoint/               weights.safetensors, ema.safetensors, config.json, state.pt
    <run>/samples/shard-NNNNN/      images.safetensors (uint8 + labels + seeds), metadata.jsonl,
                                    volumes.npy (volume datasets: uint8 (N, C, D, H, W))
    <run>/safety/                   published.safetensors, quarantine.safetensors, audit.jsonl
    <run>/metrics.json
    <run>/report/                   index.html, img/*.png

``<run>`` is ``runs/<run id>`` for a pipeline run and ``evaluations/<id>`` for an evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffusion_core.classifier import (
    TrainedClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from diffusion_core.config import DataConfig, RunConfig, SampleConfig
from diffusion_core.data import ImageDataset, load_dataset, split_dataset
from diffusion_core.metrics import (
    frechet_distance,
    half_sample_interval,
    inception_score,
    kernel_inception_distance,
)
from diffusion_core.safety import SafetyContext, build_detectors, filter_images
from diffusion_core.sampling import balanced_labels, generate
from diffusion_core.storage import ArtefactStore
from diffusion_core.training import TrainResult, load_model, train
from diffusion_core.volumes import max_projections, report_views, volume_metrics

log = logging.getLogger(__name__)

SHARD_SIZE = 10_000


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Dataset preparation.


@dataclass(frozen=True)
class DatasetRef:
    prefix: str
    url: str
    sha256: str
    num_train: int
    num_holdout: int
    class_names: list[str]
    skipped: int
    reused: bool = False


def _write_split(ds: ImageDataset, out: Path, name: str) -> None:
    for i, start in enumerate(range(0, max(len(ds), 1), SHARD_SIZE)):
        part = ds.subset(torch.arange(start, min(start + SHARD_SIZE, len(ds))))
        tensors = {"images": part.images.contiguous()}
        if part.labels is not None:
            tensors["labels"] = part.labels.contiguous()
        save_file(tensors, out / f"{name}-{i:05d}.safetensors")


def dataset_prefix(cfg: DataConfig) -> str:
    return f"datasets/{_key(cfg.model_dump(mode='json'))}"


def prepare_dataset(cfg: DataConfig, store: ArtefactStore) -> DatasetRef:
    """Load, split and store the dataset once per data config; later calls reuse it."""
    prefix = dataset_prefix(cfg)
    if store.exists_dir(prefix):
        meta = store.read_json(f"{prefix}/meta.json")
        return DatasetRef(**meta["ref"], reused=True)
    ds = load_dataset(cfg)
    train_set, holdout = split_dataset(
        ds, holdout_fraction=cfg.holdout_fraction, seed=cfg.split_seed
    )
    ref = DatasetRef(
        prefix=prefix,
        url=store.url(prefix),
        sha256=ds.sha256(),
        num_train=len(train_set),
        num_holdout=len(holdout),
        class_names=list(ds.class_names),
        skipped=ds.skipped,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _write_split(train_set, out, "train")
        _write_split(holdout, out, "holdout")
        meta = {
            "ref": {k: v for k, v in asdict(ref).items() if k != "reused"},
            "source": ds.source,
            "config": cfg.model_dump(mode="json"),
            "captions": {"train": train_set.captions, "holdout": holdout.captions},
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        store.put_dir(prefix, out)
    log.info("stored dataset %s: %d train / %d holdout", ref.url, ref.num_train, ref.num_holdout)
    return ref


def read_split(store: ArtefactStore, ref: DatasetRef, split: str) -> ImageDataset:
    """One split of a stored dataset (only its shards are fetched), each verified against the
    manifest."""
    files = store.read_manifest(ref.prefix)["files"]
    wanted = [rel for rel in sorted(files) if rel.startswith(f"{split}-") or rel == "meta.json"]
    with tempfile.TemporaryDirectory() as tmp:
        for rel in wanted:
            entry = files[rel]
            store.get_file(
                f"{ref.prefix}/{rel}", Path(tmp) / rel, sha256=entry["sha256"], size=entry["size"]
            )
        shards = sorted(Path(tmp).glob(f"{split}-*.safetensors"))
        parts = [load_file(p) for p in shards]
        meta = json.loads((Path(tmp) / "meta.json").read_text())
    labels = [p["labels"] for p in parts if "labels" in p]
    return ImageDataset(
        images=torch.cat([p["images"] for p in parts]),
        labels=torch.cat(labels) if labels else None,
        class_names=ref.class_names,
        captions=meta["captions"][split],
        source=ref.url,
        skipped=0,
    )


# ----------------------------------------------------------------------------------------------
# Training.


@dataclass(frozen=True)
class CheckpointRef:
    prefix: str
    url: str
    steps: int  # the checkpoint's step
    steps_run: int  # steps this call ran (fewer than ``steps`` when it resumed)
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_model(
    cfg: RunConfig,
    dataset: DatasetRef,
    store: ArtefactStore,
    *,
    run_prefix: str,
    work_dir: Path,
    progress: bool = False,
) -> CheckpointRef:
    """Train in a local work directory keyed by config and data (so an interrupted run resumes),
    then commit the final checkpoint under ``run_prefix/checkpoint``."""
    train_set = read_split(store, dataset, "train")
    local = work_dir / f"train-{_key([cfg.hash(), dataset.sha256])}"
    result: TrainResult = train(cfg, train_set, local, progress=progress)
    prefix = f"{run_prefix}/checkpoint"
    store.put_dir(prefix, result.checkpoint)
    steps = int(result.history[-1]["step"]) if result.history else cfg.train.steps
    return CheckpointRef(
        prefix, store.url(prefix), steps, result.steps, result.images_per_second, result.history
    )


def fetch_checkpoint(store: ArtefactStore, prefix: str, local_dir: Path) -> Path:
    store.get_dir(prefix, local_dir)
    return local_dir


# ----------------------------------------------------------------------------------------------
# Sampling.


@dataclass(frozen=True)
class ShardRef:
    prefix: str
    count: int
    seconds: float
    nfe: int


def sample_shard(
    store: ArtefactStore,
    checkpoint_prefix: str,
    sc: SampleConfig,
    *,
    out_prefix: str,
    shard: int,
    shard_size: int,
    total: int,
) -> ShardRef:
    """Samples [shard * shard_size, ...) of a class-balanced run of ``total`` samples."""
    with tempfile.TemporaryDirectory() as tmp:
        net, spec = load_model(fetch_checkpoint(store, checkpoint_prefix, Path(tmp) / "ckpt"))
    start, stop = shard * shard_size, min(total, (shard + 1) * shard_size)
    labels = None
    if spec.num_classes is not None:
        labels = balanced_labels(total, spec.num_classes)[start:stop]
    t0 = time.perf_counter()
    samples = generate(net, spec, sc, num_samples=stop - start, labels=labels, offset=start)
    seconds = time.perf_counter() - t0
    prefix = f"{out_prefix}/shard-{shard:05d}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tensors = {"images": samples.images, "seeds": samples.seeds}
        if samples.labels is not None:
            tensors["labels"] = samples.labels
        save_file(tensors, out / "images.safetensors")
        if samples.images.ndim == 5:  # volumes, also as plain numpy
            np.save(out / "volumes.npy", samples.images.numpy())
        with open(out / "metadata.jsonl", "w") as f:
            for i in range(len(samples.images)):
                record = {
                    "id": start + i,
                    "seed": int(samples.seeds[i]),
                    "label": None if samples.labels is None else int(samples.labels[i]),
                    "sampler": sc.sampler,
                    "steps": sc.steps,
                    "nfe": samples.nfe,
                    "guidance_scale": sc.guidance_scale,
                }
                f.write(json.dumps(record) + "\n")
        store.put_dir(prefix, out)
    return ShardRef(prefix, len(samples.images), seconds, samples.nfe)


def _read_tensors(store: ArtefactStore, prefix: str, name: str) -> dict[str, Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        store.get_dir(prefix, tmp)
        return load_file(Path(tmp) / name)


def read_shards(store: ArtefactStore, prefixes: list[str]) -> dict[str, Tensor]:
    parts = [_read_tensors(store, p, "images.safetensors") for p in prefixes]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------------------
# Safety filtering.


@dataclass(frozen=True)
class SafetyRef:
    prefix: str
    published: int
    quarantined: int
    flag_rates: dict[str, float]


def safety_filter(
    store: ArtefactStore,
    shard_prefixes: list[str],
    dataset: DatasetRef,
    *,
    out_prefix: str,
    detectors: list[str],
) -> SafetyRef:
    """Run the detector chain over every sample; publish what passes, quarantine the rest."""
    samples = read_shards(store, shard_prefixes)
    train_set = read_split(store, dataset, "train")
    images, train_images = samples["images"], train_set.images
    if images.ndim == 5:  # volumes: the 2-D detectors judge their maximum-intensity projections
        images, train_images = max_projections(images), max_projections(train_images)
    context = SafetyContext(train_images=train_images, labels=samples.get("labels"), metadata={})
    decision = filter_images(images, context, build_detectors(detectors, {}))
    keep = decision.published
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, mask in (("published", keep), ("quarantine", ~keep)):
            save_file(
                {k: v[mask].contiguous() for k, v in samples.items()}, out / f"{name}.safetensors"
            )
        with open(out / "audit.jsonl", "w") as f:
            for record in decision.records:
                f.write(json.dumps(record) + "\n")
        ref = SafetyRef(out_prefix, int(keep.sum()), int((~keep).sum()), decision.flag_rates())
        summary = {**asdict(ref), "detectors": detectors}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        store.put_dir(out_prefix, out)
    return ref


def read_published(store: ArtefactStore, safety_prefix: str) -> dict[str, Tensor]:
    return _read_tensors(store, safety_prefix, "published.safetensors")


# ----------------------------------------------------------------------------------------------
# Evaluation.


def domain_classifier(store: ArtefactStore, dataset: DatasetRef) -> tuple[TrainedClassifier, str]:
    """The dataset's own classifier, trained once per dataset and cached in the store; with the
    sha256 of its weights."""
    prefix = f"judges/{dataset.sha256[:16]}"
    with tempfile.TemporaryDirectory() as tmp:
        if not store.exists_dir(prefix):
            clf = train_classifier(
                read_split(store, dataset, "train"), read_split(store, dataset, "holdout")
            )
            save_classifier(clf, Path(tmp))
            store.put_dir(prefix, tmp)
        manifest = store.read_manifest(prefix)
        store.get_dir(prefix, tmp)
        return load_classifier(Path(tmp)), manifest["files"]["weights.safetensors"]["sha256"]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    record: dict[str, Any]


def evaluate_samples(
    store: ArtefactStore,
    safety_prefix: str,
    dataset: DatasetRef,
    *,
    sample: SampleConfig,
    out_key: str,
) -> Evaluation:
    """FID, KID and IS on the domain classifier's features of the published samples against the
    holdout split, with half-sample intervals, the real-vs-real floor and conditional accuracy."""
    published = read_published(store, safety_prefix)
    holdout = read_split(store, dataset, "holdout")
    clf, clf_sha = domain_classifier(store, dataset)
    images = published["images"]
    if len(images) < 2:
        raise ValueError(f"{safety_prefix}: {len(images)} published samples, too few to evaluate")
    if images.ndim == 5:  # volumes: shape statistics and MMD (diffusion_core.volumes)
        metrics = volume_metrics(images, published.get("labels"), holdout, clf)
        return _write_evaluation(store, metrics, clf_sha, dataset, sample=sample, out_key=out_key)
    n = min(len(images), len(holdout))
    ref_feats = clf.features(holdout.images)
    gen_feats = clf.features(images[:n])
    # The floor: two disjoint halves of the holdout, against each other.
    half = len(holdout) // 2
    perm = torch.randperm(len(holdout), generator=torch.Generator().manual_seed(0))
    floor = frechet_distance(ref_feats[perm[:half]], ref_feats[perm[half : 2 * half]])
    fid_half = frechet_distance(gen_feats[:half], ref_feats[perm[:half]])
    fid = frechet_distance(gen_feats, ref_feats)
    fid_lo, fid_hi = half_sample_interval(frechet_distance, gen_feats, ref_feats)
    kid = kernel_inception_distance(gen_feats, ref_feats)
    kid_lo, kid_hi = half_sample_interval(kernel_inception_distance, gen_feats, ref_feats)
    metrics = {
        "fid": fid,
        "fid_low": fid_lo,
        "fid_high": fid_hi,
        "fid_half": fid_half,
        "fid_floor_half": floor,
        "fid_half_over_floor": fid_half / floor if floor > 0 else float("inf"),
        "kid": kid,
        "kid_low": kid_lo,
        "kid_high": kid_hi,
        "inception_score": inception_score(clf.logits(images[:n])),
        "judge_holdout_accuracy": clf.holdout_accuracy,
        "num_samples": float(n),
    }
    if "labels" in published:
        metrics["conditional_accuracy"] = clf.accuracy(images, published["labels"])
    record = {
        "extractor": "domain-cnn",
        "extractor_sha256": clf_sha,
        "reference_sha256": dataset.sha256,
        "reference_split": "holdout",
        "num_samples": n,
        "sampler": sample.sampler,
        "steps": sample.steps,
        "guidance_scale": sample.guidance_scale,
        "seed": sample.seed,
    }
    store.write_json(out_key, {"metrics": metrics, "record": record})
    return Evaluation(metrics, record)


def _write_evaluation(
    store: ArtefactStore,
    metrics: dict[str, float],
    extractor_sha: str,
    dataset: DatasetRef,
    *,
    sample: SampleConfig,
    out_key: str,
) -> Evaluation:
    """Store metrics with the record that says what they are comparable with."""
    record = {
        "extractor": "domain-cnn",
        "extractor_sha256": extractor_sha,
        "reference_sha256": dataset.sha256,
        "reference_split": "holdout",
        "num_samples": int(metrics["num_samples"]),
        "sampler": sample.sampler,
        "steps": sample.steps,
        "guidance_scale": sample.guidance_scale,
        "seed": sample.seed,
    }
    store.write_json(out_key, {"metrics": metrics, "record": record})
    return Evaluation(metrics, record)


# ----------------------------------------------------------------------------------------------
# The report.


@dataclass(frozen=True)
class ReportInputs:
    run_prefix: str
    run_id: str
    model_name: str
    model_version: str
    config: dict[str, Any]
    dataset: DatasetRef
    safety: SafetyRef
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_report(store: ArtefactStore, inputs: ReportInputs) -> str:
    """Render the HTML report of a run and commit it under ``<run>/report``; returns its URL."""
    from diffusion_core.report import ReportData, write_report

    published = read_published(store, inputs.safety.prefix)
    holdout = read_split(store, inputs.dataset, "holdout")
    cfg = RunConfig.model_validate(inputs.config)
    intervals = {
        name: (inputs.metrics[f"{name}_low"], inputs.metrics[f"{name}_high"])
        for name in ("fid", "kid", "mmd")
        if f"{name}_low" in inputs.metrics
    }
    samples, figures = published["images"], []
    real_images: Tensor | None = holdout.images[:6]
    if samples.ndim == 5:  # volumes: the samples grid shows projections along z; more figures
        figures = report_views(samples, published.get("labels"), holdout)
        samples, real_images = samples.amax(dim=2), None
    data = ReportData(
        title=f"{inputs.model_name} v{inputs.model_version}",
        run_id=inputs.run_id,
        model_name=inputs.model_name,
        model_version=inputs.model_version,
        config=inputs.config,
        metrics={k: v for k, v in inputs.metrics.items() if not k.endswith(("_low", "_high"))},
        intervals=intervals,
        history=inputs.history,
        samples=samples,
        labels=published.get("labels"),
        class_names=inputs.dataset.class_names,
        real_images=real_images,
        figures=figures,
        schedule_name=cfg.diffusion.schedule,
        num_steps=cfg.diffusion.num_steps,
        safety={
            "published": inputs.safety.published,
            "quarantined": inputs.safety.quarantined,
            "flag_rates": inputs.safety.flag_rates,
        },
        comparison=inputs.comparison,
        sweep=[],
        notes=inputs.notes,
    )
    prefix = f"{inputs.run_prefix}/report"
    with tempfile.TemporaryDirectory() as tmp:
        write_report(Path(tmp), data)
        store.put_dir(prefix, tmp)
    return store.url(prefix, "index.html")


def checkpoint_config(store: ArtefactStore, checkpoint_prefix: str) -> RunConfig:
    """The resolved run config saved beside a stored checkpoint."""
    spec = json.loads(store.get_bytes(f"{checkpoint_prefix}/config.json"))
    return RunConfig.model_validate(spec["config"])
