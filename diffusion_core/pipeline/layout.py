"""Where the pipeline keeps things under the artefact store's root.

    datasets/<key>/                 train-*.safetensors, holdout-*.safetensors, meta.json
    training/<identity>/step-N/     checkpoints of one training, committed as it runs
    prefect-cache/                  Prefect's cache records and cached results (prepare_dataset)
    judges/<dataset sha256>/        the domain classifier (weights.safetensors, meta.json)
    <run>/checkpoint/               weights.safetensors, ema.safetensors, card.json, state.pt
    <run>/samples/shard-NNNNN/      images.safetensors (uint8 + labels + seeds), metadata.jsonl,
                                    volumes.npy (volume datasets: uint8 (N, C, D, H, W))
    <run>/safety/                   published.safetensors, quarantine/, audit.jsonl, summary.json
    <run>/published/                (when watermarked) published.safetensors, NNNNN.png,
                                    watermark.json
    <run>/metrics.json
    <run>/inpainting/               summary.json (RePaint vs replacement), examples.safetensors
    <run>/sweep/                    sweep.csv, sweep.json
    <run>/report/                   index.html, img/*.png

``<run>`` is ``runs/<run id>`` for a pipeline run and ``evaluations/<run id>`` for the evaluation
of a registered version. Every directory is committed with its manifest last
(``diffusion_core.pipeline.store``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

CACHE_PREFIX = "prefect-cache"  # cached task results, shared by every host of the store
MANIFEST = "manifest.json"  # written last: a directory without one does not exist for readers
TMP_DIR = ".tmp"  # in-flight writes; never listed, never part of a manifest, never a key part


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Normalise a key to ``a/b/c``; refuse absolute keys, ``..``, ``.`` and ``.tmp`` parts."""
    if not isinstance(key, str):
        raise TypeError(f"artefact key must be a str, got {type(key).__name__}")
    parts = [p for p in key.replace("\\", "/").split("/") if p]
    if key.startswith("/"):
        raise ValueError(f"artefact key must be relative: {key!r}")
    for part in parts:
        if part in (".", "..") or part == TMP_DIR:
            raise ValueError(f"artefact key may not contain {part!r}: {key!r}")
    if not parts and not allow_empty:
        raise ValueError("artefact key is empty")
    return "/".join(parts)


def is_tmp(rel: str) -> bool:
    return TMP_DIR in rel.split("/")


def check_rel(rel: str) -> str:
    """A manifest path must be a clean relative key without ``.tmp`` parts."""
    try:
        return check_key(rel)
    except ValueError:
        return ""


def content_key(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def dataset_prefix(data: dict[str, Any]) -> str:
    """The dataset built from a ``data:`` section (its JSON form)."""
    return f"datasets/{content_key(data)}"


def training_prefix(identity: str) -> str:
    """The checkpoints of one training (``RunConfig.training_identity``), committed as it runs."""
    return f"training/{identity[:16]}"


def judge_prefix(dataset_sha256: str) -> str:
    """The domain classifier trained on a dataset."""
    return f"judges/{dataset_sha256[:16]}"


@dataclass(frozen=True)
class RunLayout:
    """The prefixes of one run's artefacts."""

    root: str

    @classmethod
    def pipeline_run(cls, run_id: str) -> RunLayout:
        return cls(f"runs/{run_id}")

    @classmethod
    def evaluation(cls, run_id: str) -> RunLayout:
        return cls(f"evaluations/{run_id}")

    @property
    def checkpoint(self) -> str:
        return f"{self.root}/checkpoint"

    @property
    def samples(self) -> str:
        return f"{self.root}/samples"

    @property
    def safety(self) -> str:
        return f"{self.root}/safety"

    @property
    def published(self) -> str:
        return f"{self.root}/published"

    @property
    def metrics(self) -> str:
        return f"{self.root}/metrics.json"

    @property
    def inpainting(self) -> str:
        return f"{self.root}/inpainting"

    @property
    def sweep(self) -> str:
        return f"{self.root}/sweep"

    @property
    def report(self) -> str:
        return f"{self.root}/report"

    @property
    def champion(self) -> RunLayout:
        """Where the champion's samples and evaluation go when this run evaluates it again
        (on new data) or draws it beside the challenger."""
        return RunLayout(f"{self.root}/champion")
