"""The pipeline's stages as library functions over the artefact store.

Each stage reads its inputs by URL, does its work with the rest of ``diffusion_core`` and commits
its outputs atomically under a prefix; it returns a small summary (URLs, counts, numbers) that an
orchestrator can pass on. Layout under the store's root:

    datasets/<key>/                 train-*.safetensors, holdout-*.safetensors, meta.json
    judges/<dataset sha256>/        the domain classifier (weights.safetensors, meta.json)
    <run>/checkpoint/               weights.safetensors, ema.safetensors, config.json, state.pt
    <run>/samples/shard-NNNNN/      images.safetensors (uint8 + labels + seeds), metadata.jsonl,
                                    volumes.npy (volume datasets: uint8 (N, C, D, H, W))
    <run>/safety/                   published.safetensors, quarantine/, audit.jsonl, summary.json
    <run>/published/                (when watermarked) published.safetensors, NNNNN.png,
                                    watermark.json
    <run>/metrics.json
    <run>/inpainting/               summary.json (RePaint vs replacement), examples.safetensors
    <run>/report/                   index.html, img/*.png

``<run>`` is ``runs/<run id>`` for a pipeline run and ``evaluations/<id>`` for an evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffusion_core import fidelity, inpaint_eval
from diffusion_core import watermark as wm
from diffusion_core.classifier import (
    TrainedClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from diffusion_core.config import (
    DataConfig,
    EvaluationConfig,
    InpaintEvalConfig,
    RunConfig,
    SafetyConfig,
    SampleConfig,
    WatermarkConfig,
)
from diffusion_core.data import ImageDataset, load_dataset, split_dataset
from diffusion_core.safety import SafetyContext, build_chain, filter_images
from diffusion_core.sampling import balanced_labels, generate
from diffusion_core.storage import ArtefactStore, diffpipe_home
from diffusion_core.sweep import fewest_nfe_match, run_sweep
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
    """Samples [shard * shard_size, ...) of a class-balanced run of ``total`` samples; a
    text-conditioned model's samples cycle through ``sc.prompts`` (kept in metadata.jsonl)."""
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
                record: dict[str, Any] = {
                    "id": start + i,
                    "seed": int(samples.seeds[i]),
                    "label": None if samples.labels is None else int(samples.labels[i]),
                    "sampler": sc.sampler,
                    "steps": sc.steps,
                    "nfe": samples.nfe,
                    "guidance_scale": sc.guidance_scale,
                }
                if samples.prompts is not None:
                    record["prompt"] = samples.prompts[i]
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
    flag_counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def pixel_space_memorisation(safety: SafetyConfig) -> SafetyConfig:
    """The chain with the memorisation detector in pixel space only (for volume projections)."""
    detectors = tuple(
        d.model_copy(update={"params": {**d.params, "feature_space": False}})
        if d.name == "memorisation"
        else d
        for d in safety.detectors
    )
    return safety.model_copy(update={"detectors": detectors})


def safety_filter(
    store: ArtefactStore,
    shard_prefixes: list[str],
    dataset: DatasetRef,
    *,
    out_prefix: str,
    safety: SafetyConfig,
) -> SafetyRef:
    """Run the configured detector chain over every sample; publish what passes, quarantine
    the rest with its scores and reasons, and log every decision to ``audit.jsonl``.

    Committed as one directory (``published.safetensors``, ``quarantine/images.safetensors``,
    ``quarantine/records.jsonl``, ``audit.jsonl``, ``summary.json``), so readers see all of it
    or none. Sample ids are positions in the concatenated shards, which hold ids in order.
    """
    samples = read_shards(store, shard_prefixes)
    train_set = read_split(store, dataset, "train")
    images, train_images = samples["images"], train_set.images
    volumes = images.ndim == 5
    if volumes:  # the 2-D detectors judge the volumes' maximum-intensity projections
        images, train_images = max_projections(images), max_projections(train_images)
    judge: list[TrainedClassifier] = []

    def features(images: Tensor) -> Tensor:  # the domain classifier, fetched on first use
        if not judge:
            judge.append(domain_classifier(store, dataset)[0])
        return judge[0].features(images)

    context = SafetyContext(
        train_images=train_images,
        labels=samples.get("labels"),
        metadata={"out_prefix": out_prefix},
        # The domain classifier of a volume set reads volumes, not their projections.
        features=None if volumes else features,
    )
    n = len(images)
    if volumes:
        safety = pixel_space_memorisation(safety)
    decision = filter_images(images, context, build_chain(safety), sample_ids=range(n))
    keep = decision.published
    samples = {**samples, "sample_ids": torch.arange(n)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "quarantine").mkdir()
        for path, mask in (
            ("published.safetensors", keep),
            ("quarantine/images.safetensors", ~keep),
        ):
            save_file({k: v[mask].contiguous() for k, v in samples.items()}, out / path)
        with (
            open(out / "audit.jsonl", "w") as audit,
            open(out / "quarantine/records.jsonl", "w") as q,
        ):
            for record in decision.records:
                line = json.dumps(record) + "\n"
                audit.write(line)
                if record["decision"] == "quarantine":
                    q.write(line)
        ref = SafetyRef(
            out_prefix,
            int(keep.sum()),
            int((~keep).sum()),
            decision.flag_rates(),
            decision.flag_counts(),
            dict(decision.failures),
        )
        summary = {**asdict(ref), "safety": safety.model_dump(mode="json")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        store.put_dir(out_prefix, out)
    return ref


def read_published(store: ArtefactStore, safety_prefix: str) -> dict[str, Tensor]:
    return _read_tensors(store, safety_prefix, "published.safetensors")


# ----------------------------------------------------------------------------------------------
# Watermarking the published images.


@dataclass(frozen=True)
class WatermarkRef:
    prefix: str
    marked: int
    model_name: str
    model_version: str
    key_id: str
    strength: float
    psnr_mean: float | None
    psnr_min: float | None
    safety: SafetyRef  # the filter's decision, with ``prefix`` pointing at the marked images

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "safety"}


def watermark_published(
    store: ArtefactStore,
    safety: SafetyRef,
    *,
    out_prefix: str,
    model_name: str,
    model_version: str,
    run_id: str,
    cfg: WatermarkConfig,
) -> WatermarkRef:
    """Mark the published images of a filtered run with the model's name tag and version and
    commit them under ``out_prefix``: ``published.safetensors`` (the marked images with their
    labels and seeds), ``NNNNN.png`` (the same, with provenance tEXt) and ``watermark.json``.

    Only the published set is read; the safety directory is left as the filter wrote it. The
    returned ``safety`` points at ``out_prefix``, so what reads the published images next
    (evaluation, report) reads the marked ones. Every marked image is decoded again before the
    commit, and one that does not hold the payload fails the stage (nothing is committed).
    Re-running returns the committed record.
    """
    if store.exists_dir(out_prefix):
        return _watermark_ref(store.read_json(f"{out_prefix}/watermark.json")["ref"])
    key = wm.load_key(key_file=cfg.key_file, key_env=cfg.key_env, create=True)
    payload = wm.Payload.for_model(model_name, model_version)
    provenance = wm.Provenance(model_name, model_version, run_id, key.key_id)
    published = read_published(store, safety.prefix)
    images = published["images"]
    marked = wm.embed(images, payload, key, strength=cfg.strength)
    failed = [i for i, r in enumerate(wm.decode(marked, key, strength=cfg.strength))
              if r.payload != payload]  # fmt: skip
    if failed:
        raise wm.WatermarkError(
            f"{safety.prefix}: {len(failed)} of {len(images)} published images do not hold the "
            f"mark after embedding (first: {failed[:5]}); raise pipeline.watermark.strength"
        )
    psnrs = [wm.psnr(a, b) for a, b in zip(images, marked, strict=True)]
    ref = WatermarkRef(
        prefix=out_prefix,
        marked=len(marked),
        model_name=model_name,
        model_version=model_version,
        key_id=key.key_id,
        strength=cfg.strength,
        psnr_mean=float(np.mean(psnrs)) if psnrs else None,
        psnr_min=float(np.min(psnrs)) if psnrs else None,
        safety=replace(safety, prefix=out_prefix),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_file({**published, "images": marked.contiguous()}, out / "published.safetensors")
        for i, image in enumerate(marked):
            wm.save_png(image, out / f"{i:05d}.png", provenance)
        record = {"ref": asdict(ref), "scheme": wm.SCHEME, "payload_bits": wm.PAYLOAD_BITS}
        (out / "watermark.json").write_text(json.dumps(record, indent=2))
        store.put_dir(out_prefix, out)
    log.info("watermarked %d published images (key id %s)", ref.marked, ref.key_id)
    return ref


def _watermark_ref(record: dict[str, Any]) -> WatermarkRef:
    return WatermarkRef(**{**record, "safety": SafetyRef(**record["safety"])})


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


def evaluation_extractor(
    store: ArtefactStore, dataset: DatasetRef, ec: EvaluationConfig, work_dir: Path
) -> tuple[fidelity.Extractor, TrainedClassifier]:
    """The configured feature extractor, and the domain classifier (the judge of conditional
    accuracy whichever extractor computes the features). Fetched Inception weights are cached
    under ``$DIFFPIPE_HOME/cache/weights``."""
    judge, judge_sha = domain_classifier(store, dataset)
    if ec.extractor == "inception-v3-compat":
        return fidelity.inception_extractor(ec, diffpipe_home() / "cache" / "weights"), judge
    save_classifier(judge, work_dir)
    return fidelity.Extractor(fidelity.DOMAIN, work_dir, judge_sha), judge


def _reference_record(
    engine: str, extractor: str, extractor_sha256: str, dataset: DatasetRef, num_reference: int
) -> dict[str, Any]:
    """What a metric was measured with and against: the metric record's reference part."""
    return {
        "engine": engine,
        "extractor": extractor,
        "extractor_sha256": extractor_sha256,
        "reference_sha256": dataset.sha256,
        "reference_split": "holdout",
        "num_reference": num_reference,
    }


def _sampling_record(sample: SampleConfig) -> dict[str, Any]:
    """How the judged samples were drawn: the metric record's sampling part."""
    return {
        "sampler": sample.sampler,
        "steps": sample.steps,
        "nfe": sample.steps,  # one network call per step; guided halves are one 2B batch
        "spacing": sample.spacing,
        "eta": sample.eta,
        "guidance_scale": sample.guidance_scale,
        "seed": sample.seed,
    }


def evaluate_samples(
    store: ArtefactStore,
    safety_prefix: str,
    dataset: DatasetRef,
    *,
    sample: SampleConfig,
    out_key: str,
    evaluation: EvaluationConfig | None = None,
) -> Evaluation:
    """FID, KID, IS and precision/recall (torch-fidelity, on the configured extractor's features)
    of the published samples against the holdout split, with intervals, the real-vs-real floor
    and conditional accuracy; the record says what the numbers may be compared with."""
    ec = evaluation or EvaluationConfig()
    published = read_published(store, safety_prefix)
    holdout = read_split(store, dataset, "holdout")
    if published["images"].ndim == 5:  # volumes: shape statistics and MMD (diffusion_core.volumes)
        clf, clf_sha = domain_classifier(store, dataset)
        metrics = volume_metrics(published["images"], published.get("labels"), holdout, clf)
        return _write_volume_evaluation(
            store, metrics, clf_sha, dataset, sample=sample, out_key=out_key
        )
    n = min(len(published["images"]), ec.num_samples or len(published["images"]))
    if n < fidelity.MIN_IMAGES:
        raise ValueError(f"{safety_prefix}: {n} published samples, too few to evaluate")
    images = published["images"][:n]
    with tempfile.TemporaryDirectory() as tmp:
        extractor, judge = evaluation_extractor(store, dataset, ec, Path(tmp))
        metrics = fidelity.score(
            images, holdout.images, extractor, cuda=torch.cuda.is_available(),
            batch_size=ec.batch_size, draws=ec.interval_draws, level=ec.interval_level,
            seed=sample.seed,
        )  # fmt: skip
    metrics["judge_holdout_accuracy"] = judge.holdout_accuracy
    if "labels" in published:
        metrics["conditional_accuracy"] = judge.accuracy(images, published["labels"][:n])
        metrics["accuracy_gap"] = judge.holdout_accuracy - metrics["conditional_accuracy"]
    seeds = published["seeds"][:n]
    record = {
        **_reference_record(fidelity.ENGINE, ec.extractor, extractor.sha256, dataset, len(holdout)),
        "num_samples": n,
        **_sampling_record(sample),
        "seeds": f"{int(seeds.min())}..{int(seeds.max())}",  # per-sample noise seeds
    }
    store.write_json(out_key, {"metrics": metrics, "record": record})
    return Evaluation(metrics, record)


@dataclass(frozen=True)
class SweepRef:
    prefix: str
    rows: list[dict[str, Any]]
    note: str  # which setting reaches the reference quality with the fewest NFE
    match: dict[str, Any] | None


def sweep_samplers(
    store: ArtefactStore,
    checkpoint_prefix: str,
    dataset: DatasetRef,
    cfg: RunConfig,
    *,
    out_prefix: str,
) -> SweepRef:
    """Quality against sampling cost over ``cfg.evaluation.sweep`` (see ``diffusion_core.sweep``):
    ``sweep.csv`` and ``sweep.json`` (rows, reference, cheapest match, record) under
    ``out_prefix``. Sweep samples are judged raw (no safety filter) and never published."""
    ec = cfg.evaluation
    if not ec.sweep:
        raise ValueError("evaluation.sweep is empty: nothing to sweep")
    holdout = read_split(store, dataset, "holdout")
    with tempfile.TemporaryDirectory() as tmp:
        net, spec = load_model(fetch_checkpoint(store, checkpoint_prefix, Path(tmp) / "ckpt"))
        if torch.cuda.is_available():
            net = net.cuda()
        extractor, _ = evaluation_extractor(store, dataset, ec, Path(tmp) / "extractor")
        judge = partial(
            fidelity.score, reference=holdout.images, extractor=extractor,
            cuda=torch.cuda.is_available(), batch_size=ec.batch_size, draws=ec.interval_draws,
            level=ec.interval_level, seed=cfg.sample.seed,
        )  # fmt: skip
        rows = run_sweep(
            net, spec, cfg.sample, ec.sweep, num_samples=ec.sweep_num_samples, judge=judge
        )
    best = fewest_nfe_match(rows)
    record = {
        **_reference_record(fidelity.ENGINE, ec.extractor, extractor.sha256, dataset, len(holdout)),
        "safety_filter": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with open(out / "sweep.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "sweep.json").write_text(
            json.dumps({"rows": rows, **best, "record": record}, indent=2)
        )
        store.put_dir(out_prefix, out)
    return SweepRef(out_prefix, rows, best["note"], best["match"])


# ----------------------------------------------------------------------------------------------
# Inpainting evaluation.


@dataclass(frozen=True)
class InpaintEvaluation:
    prefix: str
    metrics: dict[str, float]  # inpaint/<mask>/<method>/<stat>, inpaint/known_region_exact
    rows: list[dict[str, Any]]  # one per (mask kind, method)


def evaluate_inpainting(
    store: ArtefactStore,
    checkpoint_prefix: str,
    dataset: DatasetRef,
    *,
    sample: SampleConfig,
    config: InpaintEvalConfig,
    out_prefix: str,
) -> InpaintEvaluation:
    """RePaint against plain replacement on the first holdout images with the standard masks;
    commits ``summary.json`` (rows, metrics, config) and ``examples.safetensors`` (the report's
    example completions) under ``out_prefix``."""
    holdout = read_split(store, dataset, "holdout")
    with tempfile.TemporaryDirectory() as tmp:
        net, spec = load_model(fetch_checkpoint(store, checkpoint_prefix, Path(tmp) / "ckpt"))
    result = inpaint_eval.evaluate_inpainting(net, spec, sample, holdout.images, config)
    metrics = inpaint_eval.inpainting_metrics(result.rows)
    with tempfile.TemporaryDirectory() as tmp:
        summary = {"metrics": metrics, "rows": result.rows, "config": config.model_dump()}
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2))
        save_file({"images": result.examples.contiguous()}, Path(tmp) / "examples.safetensors")
        store.put_dir(out_prefix, tmp)
    return InpaintEvaluation(out_prefix, metrics, result.rows)


def read_inpainting(store: ArtefactStore, prefix: str) -> tuple[list[dict[str, Any]], Tensor]:
    """The rows and example images committed by ``evaluate_inpainting``."""
    with tempfile.TemporaryDirectory() as tmp:
        store.get_dir(prefix, tmp)
        rows = json.loads((Path(tmp) / "summary.json").read_text())["rows"]
        return rows, load_file(Path(tmp) / "examples.safetensors")["images"]


def _write_volume_evaluation(
    store: ArtefactStore,
    metrics: dict[str, float],
    extractor_sha: str,
    dataset: DatasetRef,
    *,
    sample: SampleConfig,
    out_key: str,
) -> Evaluation:
    """Store a volume evaluation with the record that says what it is comparable with."""
    record = {
        **_reference_record(
            "diffpipe volume statistics", "domain-cnn-3d", extractor_sha, dataset,
            int(metrics["num_reference"]),
        ),
        "num_samples": int(metrics["num_samples"]),
        **_sampling_record(sample),
    }  # fmt: skip
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
    inpainting_prefix: str | None = None  # an evaluate_inpainting output, when it ran
    promotion: dict[str, Any] = field(default_factory=dict)  # promoted, reason, previous_champion
    sweep: list[dict[str, Any]] = field(default_factory=list)


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
            "flag_counts": inputs.safety.flag_counts,
            **(
                {"failed_detectors": sorted(inputs.safety.failures)}
                if inputs.safety.failures
                else {}
            ),
        },
        comparison=inputs.comparison,
        sweep=inputs.sweep,
        notes=inputs.notes,
        promotion=inputs.promotion,
    )
    if inputs.inpainting_prefix is not None:
        data.inpainting, data.inpainting_examples = read_inpainting(store, inputs.inpainting_prefix)
    prefix = f"{inputs.run_prefix}/report"
    with tempfile.TemporaryDirectory() as tmp:
        write_report(Path(tmp), data)
        store.put_dir(prefix, tmp)
    return store.url(prefix, "index.html")


def checkpoint_config(store: ArtefactStore, checkpoint_prefix: str) -> RunConfig:
    """The resolved run config saved beside a stored checkpoint."""
    spec = json.loads(store.get_bytes(f"{checkpoint_prefix}/config.json"))
    return RunConfig.model_validate(spec["config"])
