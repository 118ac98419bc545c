"""The training stage: train (or resume) in a local work directory keyed by the training identity,
then commit the checkpoint, with this run's model card, to the store."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from diffusion_core.config import RunConfig
from diffusion_core.model import CARD_FILE
from diffusion_core.pipeline.stages.dataset import DatasetRef, read_split
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.training import TrainResult, train


@dataclass(frozen=True)
class CheckpointRef:
    prefix: str
    url: str
    steps: int  # the checkpoint's step
    steps_run: int  # steps this call ran (fewer than ``steps`` when it resumed, 0 when complete)
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)


def work_dir_for(cfg: RunConfig, dataset: DatasetRef, work_dir: Path) -> Path:
    """The local training directory of ``cfg`` on ``dataset``: keyed by what changes the trained
    weights, so changing sampling, safety, evaluation or sharding resumes the same training."""
    return work_dir / f"train-{cfg.training_identity(dataset.sha256)[:16]}"


def train_model(
    cfg: RunConfig,
    dataset: DatasetRef,
    store: ArtefactStore,
    *,
    checkpoint_prefix: str,
    work_dir: Path,
    progress: bool = False,
) -> CheckpointRef:
    """Train (an interrupted run resumes, a finished one runs 0 steps), then commit the final
    checkpoint under ``checkpoint_prefix`` with this run's card (its sampling defaults are this
    config's)."""
    train_set = read_split(store, dataset, "train")
    result: TrainResult = train(
        cfg, train_set, work_dir_for(cfg, dataset, work_dir), progress=progress
    )
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "checkpoint"
        shutil.copytree(result.checkpoint, staged)
        (staged / CARD_FILE).write_text(result.card.to_json())
        store.put_dir(checkpoint_prefix, staged)
    steps = int(result.history[-1]["step"]) if result.history else cfg.train.steps
    return CheckpointRef(
        checkpoint_prefix,
        store.url(checkpoint_prefix),
        steps,
        result.steps,
        result.images_per_second,
        result.history,
    )
