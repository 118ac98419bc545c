"""The dataset stage: load, split and store a dataset once per data config; read its splits back;
train the dataset's own judge (the domain classifier) once per dataset."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusion_core.config import VOLUME_KINDS, ConfigError, DataConfig, RunConfig, SafetyConfig
from diffusion_core.data import ImageDataset, load_dataset, source_fingerprint, split_dataset
from diffusion_core.data.sharded import ShardedDataset
from diffusion_core.evaluation.judge import (
    TrainedClassifier,
    load_classifier,
    save_classifier,
    train_judge,
)
from diffusion_core.pipeline.layout import dataset_prefix, judge_prefix
from diffusion_core.pipeline.store import ArtefactStore

log = logging.getLogger(__name__)

SHARD_SIZE = 10_000


@dataclass(frozen=True)
class DatasetRef:
    prefix: str
    url: str
    sha256: str
    num_train: int
    num_holdout: int
    class_names: list[str]
    skipped: int
    dims: int = 2  # 2 images, 3 volumes
    reused: bool = False

    @classmethod
    def from_meta(cls, meta: dict[str, Any], *, reused: bool) -> DatasetRef:
        """The reference stored in a dataset's ``meta.json`` (older ones name no ``dims``:
        it follows from the data kind)."""
        dims = 3 if meta.get("config", {}).get("kind") in VOLUME_KINDS else 2
        return cls.from_json(json.dumps(meta["ref"]), dims=dims, reused=reused)

    @classmethod
    def from_json(cls, text: str, *, dims: int, reused: bool = True) -> DatasetRef:
        """A reference saved by :meth:`to_json` (a registered version's tag); ``dims`` for one
        saved before references named it."""
        ref = {k: v for k, v in json.loads(text).items() if k != "reused"}
        return cls(**{"dims": dims, **ref}, reused=reused)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "reused"})


def _write_split(ds: ImageDataset, out: Path, name: str) -> None:
    for i, start in enumerate(range(0, max(len(ds), 1), SHARD_SIZE)):
        part = ds.subset(torch.arange(start, min(start + SHARD_SIZE, len(ds))))
        tensors = {"images": part.images.contiguous()}
        if part.labels is not None:
            tensors["labels"] = part.labels.contiguous()
        save_file(tensors, out / f"{name}-{i:05d}.safetensors")


def stored_prefix(cfg: DataConfig, fingerprint: str) -> str:
    """Where the dataset of ``cfg`` built from a source with ``fingerprint`` is stored."""
    return dataset_prefix(cfg.model_dump(mode="json") | {"source_fingerprint": fingerprint})


def prepare_dataset(
    cfg: DataConfig, store: ArtefactStore, fingerprint: str | None = None
) -> DatasetRef:
    """Load, split and store the dataset once per data config and source contents
    (``fingerprint``, from ``source_fingerprint`` when not given); later calls reuse it. New,
    changed or deleted files in the source give a new dataset."""
    fingerprint = fingerprint or source_fingerprint(cfg)
    prefix = stored_prefix(cfg, fingerprint)
    if store.exists_dir(prefix):
        return DatasetRef.from_meta(store.read_json(f"{prefix}/meta.json"), reused=True)
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
        dims=ds.dims,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _write_split(train_set, out, "train")
        _write_split(holdout, out, "holdout")
        meta = {
            "ref": json.loads(ref.to_json()),
            "source": ds.source,
            "config": cfg.model_dump(mode="json"),
            "source_fingerprint": fingerprint,
            "captions": {"train": train_set.captions, "holdout": holdout.captions},
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        store.put_dir(prefix, out)
    log.info("stored dataset %s: %d train / %d holdout", ref.url, ref.num_train, ref.num_holdout)
    return ref


def check_fits(cfg: RunConfig, class_names: Sequence[str], *, training: bool = True) -> None:
    """The settings that need the data, checked against it before any work: on data without
    labels (a flat folder), a class-conditional model (``training``) and a memorisation detector
    in the classifier's feature space cannot be honoured when asked for; the ConfigError names
    the keys to change. Left at their defaults they adapt: the model trains unconditional, the
    detector works in pixel space (:func:`pixel_memorisation`)."""
    if class_names:
        return
    source = cfg.data.root or cfg.data.kind if training else "the model's data"
    where = f"{source} has no class labels (no class sub-folders)"
    model = cfg.model
    asked = model.class_conditional and "class_conditional" in model.model_fields_set
    if training and cfg.text is None and asked:
        raise ConfigError(
            f"model.class_conditional: true, but {where}; set model.class_conditional: "
            "false, or put the images in one sub-folder per class"
        )
    for i, detector in enumerate(cfg.safety.detectors):
        feature_space = detector.params.get("feature_space")
        if detector.name == "memorisation" and detector.enabled and feature_space is True:
            raise ConfigError(
                f"safety.detectors[{i}].params.feature_space: true compares samples in the "
                f"feature space of the dataset's classifier, but {where}; set it to false "
                "(pixel space), or put the images in one sub-folder per class"
            )


def pixel_memorisation(safety: SafetyConfig, dataset: DatasetRef) -> SafetyConfig:
    """``safety`` as it runs on ``dataset``: without labels, the memorisation detector compares
    in pixel space unless its ``feature_space`` is set (:func:`check_fits` refuses true)."""
    if dataset.class_names:
        return safety
    detectors = tuple(
        d.model_copy(update={"params": {"feature_space": False, **d.params}})
        if d.name == "memorisation"
        else d
        for d in safety.detectors
    )
    return safety.model_copy(update={"detectors": detectors})


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


def open_split(store: ArtefactStore, ref: DatasetRef, split: str, cache: Path) -> ShardedDataset:
    """One split of a stored dataset, read from local copies of its shards as it is needed
    (training's view: memory does not grow with the dataset). The shards are fetched into
    ``cache`` once, each verified against the manifest; a copy verified before is reused."""
    files = store.read_manifest(ref.prefix)["files"]
    folder = cache / ref.sha256[:16]
    local = []
    for rel in sorted(f for f in files if f.startswith(f"{split}-") or f == "meta.json"):
        entry, path = files[rel], folder / rel
        marker = path.with_name(f".{path.name}.sha256")
        verified = marker.is_file() and marker.read_text() == entry["sha256"]
        if not (verified and path.is_file() and path.stat().st_size == entry["size"]):
            store.get_file(f"{ref.prefix}/{rel}", path, sha256=entry["sha256"], size=entry["size"])
            marker.write_text(entry["sha256"])
        if rel != "meta.json":
            local.append(path)
    meta = json.loads((folder / "meta.json").read_text())
    return ShardedDataset(
        local,
        class_names=ref.class_names,
        captions=meta["captions"][split],
        sha256=ref.sha256,
        source=ref.url,
    )


def domain_classifier(
    store: ArtefactStore, dataset: DatasetRef, device: torch.device | str = "cpu"
) -> tuple[TrainedClassifier, str]:
    """The dataset's own classifier (on ``device``; of the images' turn when the dataset has no
    labels), trained once per dataset and cached in the store; with the sha256 of its
    weights."""
    prefix = judge_prefix(dataset.sha256)
    with tempfile.TemporaryDirectory() as tmp:
        if not store.exists_dir(prefix):
            clf = train_judge(
                read_split(store, dataset, "train"),
                read_split(store, dataset, "holdout"),
                device=device,
            )
            save_classifier(clf, Path(tmp))
            store.put_dir(prefix, tmp)
        manifest = store.read_manifest(prefix)
        store.get_dir(prefix, tmp)
        judge = load_classifier(Path(tmp)).to(device)
        return judge, manifest["files"]["weights.safetensors"]["sha256"]
