"""The pipeline's Prefect tasks: each a short typed adapter over one diffusion_core stage.

Tasks take and return URLs, prefixes and small summaries, never tensors or models. Retries
(with backoff) apply only to storage and network I/O: a ``StorageError`` that is not a missing
artefact or a checksum mismatch.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from diffusion_core import compare, stages
from diffusion_core.config import (
    DataConfig,
    EvaluationConfig,
    InpaintEvalConfig,
    RunConfig,
    SafetyConfig,
    SampleConfig,
    WatermarkConfig,
)
from diffusion_core.storage import (
    ArtefactNotFoundError,
    ArtefactStore,
    IntegrityError,
    StorageError,
)
from tasks import tracking

# Seconds between tries of an I/O task; DIFFPIPE_RETRY_DELAYS="2,8" style to change.
RETRY_DELAYS = [float(s) for s in os.environ.get("DIFFPIPE_RETRY_DELAYS", "2,8").split(",")]


def retry_on_storage(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry transient storage failures only; bad data or missing artefacts do not heal."""
    try:
        state.result()
    except (ArtefactNotFoundError, IntegrityError):
        return False
    except StorageError:
        return True
    except BaseException:  # any other failure is not retried
        return False
    return False


io_retries: dict[str, Any] = {
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": retry_on_storage,
}


@task(
    name="prepare-dataset",
    task_run_name="prepare-dataset-{data[kind]}",
    cache_policy=INPUTS + TASK_SOURCE,
    cache_expiration=timedelta(days=7),
    **io_retries,
)
def prepare_dataset(data: dict[str, Any], artefact_root: str) -> stages.DatasetRef:
    return stages.prepare_dataset(DataConfig.model_validate(data), ArtefactStore(artefact_root))


def prepare_dataset_cached(data: dict[str, Any], artefact_root: str) -> stages.DatasetRef:
    """prepare_dataset, reusing a cached result only while its dataset is still committed in
    the store (a cache entry outliving a deleted or unreachable dataset is refreshed)."""
    prefix = stages.dataset_prefix(DataConfig.model_validate(data))
    stale = not ArtefactStore(artefact_root).exists_dir(prefix)
    return prepare_dataset.with_options(refresh_cache=stale)(data, artefact_root)


@task(name="train", task_run_name="train-{run_prefix}", cache_policy=NO_CACHE, **io_retries)
def train(
    config: dict[str, Any],
    dataset: stages.DatasetRef,
    artefact_root: str,
    run_prefix: str,
    work_dir: str,
) -> stages.CheckpointRef:
    return stages.train_model(
        RunConfig.model_validate(config),
        dataset,
        ArtefactStore(artefact_root),
        run_prefix=run_prefix,
        work_dir=Path(work_dir),
    )


@task(name="register", task_run_name="register-{model_name}", cache_policy=NO_CACHE, **io_retries)
def register(
    checkpoint: stages.CheckpointRef,
    artefact_root: str,
    tracking_uri: str,
    run_id: str,
    model_name: str,
    tags: dict[str, str],
) -> tracking.ModelRef:
    with tracking.temp_dir() as tmp:
        local = stages.fetch_checkpoint(ArtefactStore(artefact_root), checkpoint.prefix, Path(tmp))
        return tracking.register_model(
            tracking_uri, run_id, name=model_name, checkpoint_dir=local, tags=tags
        )


@task(name="sample", task_run_name="sample-shard-{shard}", cache_policy=NO_CACHE, **io_retries)
def sample(
    artefact_root: str,
    checkpoint_prefix: str,
    sample_config: dict[str, Any],
    out_prefix: str,
    shard: int,
    shard_size: int,
    total: int,
) -> stages.ShardRef:
    return stages.sample_shard(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        SampleConfig.model_validate(sample_config),
        out_prefix=out_prefix,
        shard=shard,
        shard_size=shard_size,
        total=total,
    )


@task(name="safety-filter", cache_policy=NO_CACHE, **io_retries)
def safety_filter(
    artefact_root: str,
    shards: list[stages.ShardRef],
    dataset: stages.DatasetRef,
    out_prefix: str,
    safety: dict[str, Any],
) -> stages.SafetyRef:
    return stages.safety_filter(
        ArtefactStore(artefact_root),
        [s.prefix for s in shards],
        dataset,
        out_prefix=out_prefix,
        safety=SafetyConfig.model_validate(safety),
    )


@task(name="watermark", cache_policy=NO_CACHE, **io_retries)
def watermark(
    artefact_root: str,
    safety: stages.SafetyRef,
    model: tracking.ModelRef,
    run_id: str,
    out_prefix: str,
    watermark_config: dict[str, Any],
) -> stages.WatermarkRef:
    """Mark the published images with the model version (the key is read inside, never passed)."""
    return stages.watermark_published(
        ArtefactStore(artefact_root),
        safety,
        out_prefix=out_prefix,
        model_name=model.name,
        model_version=model.version,
        run_id=run_id,
        cfg=WatermarkConfig.model_validate(watermark_config),
    )


@task(name="evaluate", cache_policy=NO_CACHE, **io_retries)
def evaluate(
    artefact_root: str,
    safety: stages.SafetyRef,
    dataset: stages.DatasetRef,
    sample_config: dict[str, Any],
    out_key: str,
    evaluation_config: dict[str, Any] | None = None,
) -> stages.Evaluation:
    return stages.evaluate_samples(
        ArtefactStore(artefact_root),
        safety.prefix,
        dataset,
        sample=SampleConfig.model_validate(sample_config),
        out_key=out_key,
        evaluation=EvaluationConfig.model_validate(evaluation_config or {}),
    )


@task(name="sweep", cache_policy=NO_CACHE, **io_retries)
def sweep(
    artefact_root: str,
    checkpoint_prefix: str,
    dataset: stages.DatasetRef,
    config: dict[str, Any],
    out_prefix: str,
) -> stages.SweepRef:
    """Quality against sampling cost over the config's ``evaluation.sweep``."""
    return stages.sweep_samplers(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        dataset,
        RunConfig.model_validate(config),
        out_prefix=out_prefix,
    )


@task(name="inpaint-evaluate", cache_policy=NO_CACHE, **io_retries)
def inpaint_evaluate(
    artefact_root: str,
    checkpoint_prefix: str,
    dataset: stages.DatasetRef,
    sample_config: dict[str, Any],
    inpaint_config: dict[str, Any],
    out_prefix: str,
) -> stages.InpaintEvaluation:
    return stages.evaluate_inpainting(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        dataset,
        sample=SampleConfig.model_validate(sample_config),
        config=InpaintEvalConfig.model_validate(inpaint_config),
        out_prefix=out_prefix,
    )


@task(name="report", cache_policy=NO_CACHE, **io_retries)
def report(artefact_root: str, inputs: stages.ReportInputs) -> str:
    return stages.make_report(ArtefactStore(artefact_root), inputs)


@task(name="compare-promote", task_run_name="compare-{model.name}-v{model.version}",
      cache_policy=NO_CACHE)  # fmt: skip
def compare_promote(
    tracking_uri: str, model: tracking.ModelRef, evaluation: stages.Evaluation
) -> dict[str, Any]:
    """Record the evaluation on the version; promote it to champion when it wins."""
    current = tracking.champion(tracking_uri, model.name)
    tracking.set_evaluation(tracking_uri, model, asdict(evaluation))
    champion_eval = None if current is None else current[1]
    if current is not None and champion_eval is None:
        champion_eval = {"record": {}, "metrics": {}}  # an unevaluated champion is not comparable
    decision = compare.decide(asdict(evaluation), champion_eval)
    if decision.promote:
        tracking.set_champion(tracking_uri, model.name, model.version)
    return {
        "promoted": decision.promote,
        "reason": decision.reason,
        "previous_champion": None if current is None else current[0],
    }
