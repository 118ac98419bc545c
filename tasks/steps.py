"""The pipeline's Prefect tasks: each a short typed adapter over one ``diffusion_core`` stage.

Tasks take typed objects (config sections, stage references) and return stage references: URLs,
prefixes and small summaries, never tensors or models. Retries (with backoff) apply only to
storage and network I/O: a ``StorageError`` that is not a missing artefact or a checksum mismatch.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from diffusion_core.config import (
    DataConfig,
    EvaluationConfig,
    InpaintEvalConfig,
    RunConfig,
    SafetyConfig,
    WatermarkConfig,
)
from diffusion_core.pipeline.errors import ArtefactNotFoundError, IntegrityError, StorageError
from diffusion_core.pipeline.layout import dataset_prefix
from diffusion_core.pipeline.stages import (
    dataset,
    evaluate,
    inpaint,
    report,
    safety,
    sample,
    sweep,
    train,
    watermark,
)
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.sampling import SampleRequest
from diffusion_core.settings import settings


def transient(exc: BaseException) -> bool:
    """A failure that may heal on a retry: storage or network I/O that failed (not a missing
    artefact or a checksum mismatch), a refused or timed-out connection."""
    if isinstance(exc, ArtefactNotFoundError | IntegrityError):
        return False
    if isinstance(exc, StorageError | ConnectionError | TimeoutError):
        return True
    try:
        from requests.exceptions import ConnectionError as RequestsConnectionError
        from requests.exceptions import Timeout
    except ImportError:  # pragma: no cover - requests comes with mlflow
        return False
    return isinstance(exc, RequestsConnectionError | Timeout)


def retry_on_io(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry transient I/O failures only; bad data or missing artefacts do not heal."""
    try:
        state.result()
    except BaseException as exc:
        return transient(exc)
    return False


def retry_options() -> dict[str, Any]:
    """Prefect's retry options for an I/O task: one retry per delay of ``DIFFPIPE_RETRY_DELAYS``
    (through the settings), on transient failures only. Prefect fixes a task's retries when the
    task is defined, so this is read when this module defines its tasks."""
    delays = list(settings().retry_delays)
    return {
        "retries": len(delays),
        "retry_delay_seconds": delays,
        "retry_condition_fn": retry_on_io,
    }


io_retries: dict[str, Any] = retry_options()


@task(
    name="prepare-dataset",
    task_run_name="prepare-dataset-{data.kind}",
    cache_policy=INPUTS + TASK_SOURCE,
    cache_expiration=timedelta(days=7),
    **io_retries,
)
def prepare_dataset(data: DataConfig, artefact_root: str) -> dataset.DatasetRef:
    return dataset.prepare_dataset(data, ArtefactStore(artefact_root))


def prepare_dataset_cached(data: DataConfig, artefact_root: str) -> dataset.DatasetRef:
    """prepare_dataset, reusing a cached result only while its dataset is still committed in
    the store (a cache entry outliving a deleted or unreachable dataset is refreshed)."""
    prefix = dataset_prefix(data.model_dump(mode="json"))
    stale = not ArtefactStore(artefact_root).exists_dir(prefix)
    return prepare_dataset.with_options(refresh_cache=stale)(data, artefact_root)


@task(name="train", task_run_name="train-{checkpoint_prefix}", cache_policy=NO_CACHE, **io_retries)
def train_model(
    config: RunConfig,
    data: dataset.DatasetRef,
    artefact_root: str,
    checkpoint_prefix: str,
    work_dir: str,
) -> train.CheckpointRef:
    return train.train_model(
        config,
        data,
        ArtefactStore(artefact_root),
        checkpoint_prefix=checkpoint_prefix,
        work_dir=Path(work_dir),
    )


@task(name="sample", task_run_name="sample-shard-{shard}", cache_policy=NO_CACHE, **io_retries)
def sample_shard(
    artefact_root: str,
    checkpoint_prefix: str,
    request: SampleRequest,
    out_prefix: str,
    shard: int,
    shard_size: int,
) -> sample.ShardRef:
    return sample.sample_shard(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        request,
        out_prefix=out_prefix,
        shard=shard,
        shard_size=shard_size,
    )


@task(name="safety-filter", cache_policy=NO_CACHE, **io_retries)
def safety_filter(
    artefact_root: str,
    shards: list[sample.ShardRef],
    data: dataset.DatasetRef,
    out_prefix: str,
    config: SafetyConfig,
) -> safety.SafetyRef:
    return safety.safety_filter(
        ArtefactStore(artefact_root),
        [s.prefix for s in shards],
        data,
        out_prefix=out_prefix,
        safety=config,
    )


@task(name="watermark", cache_policy=NO_CACHE, **io_retries)
def watermark_published(
    artefact_root: str,
    published: safety.SafetyRef,
    model_name: str,
    model_version: str,
    run_id: str,
    out_prefix: str,
    config: WatermarkConfig,
) -> watermark.WatermarkRef:
    """Mark the published images with the model version (the key is read inside, never passed)."""
    return watermark.watermark_published(
        ArtefactStore(artefact_root),
        published,
        out_prefix=out_prefix,
        model_name=model_name,
        model_version=model_version,
        run_id=run_id,
        cfg=config,
    )


@task(name="evaluate", cache_policy=NO_CACHE, **io_retries)
def evaluate_samples(
    artefact_root: str,
    published: safety.SafetyRef,
    data: dataset.DatasetRef,
    shards: list[sample.ShardRef],
    seed: int,
    out_key: str,
    config: EvaluationConfig,
) -> evaluate.Evaluation:
    return evaluate.evaluate_samples(
        ArtefactStore(artefact_root),
        published.prefix,
        data,
        knobs=shards[0].knobs,
        nfe=shards[0].nfe,
        seed=seed,
        out_key=out_key,
        evaluation=config,
    )


@task(name="sweep", cache_policy=NO_CACHE, **io_retries)
def sweep_samplers(
    artefact_root: str,
    checkpoint_prefix: str,
    data: dataset.DatasetRef,
    request: SampleRequest,
    config: EvaluationConfig,
    out_prefix: str,
) -> sweep.SweepRef:
    """Quality against sampling cost over ``config.sweep``."""
    return sweep.sweep_samplers(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        data,
        request=request,
        evaluation=config,
        out_prefix=out_prefix,
    )


@task(name="inpaint-evaluate", cache_policy=NO_CACHE, **io_retries)
def evaluate_inpainting(
    artefact_root: str,
    checkpoint_prefix: str,
    data: dataset.DatasetRef,
    request: SampleRequest,
    config: InpaintEvalConfig,
    out_prefix: str,
) -> inpaint.InpaintEvaluation:
    return inpaint.evaluate_inpainting(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        data,
        request=request,
        config=config,
        out_prefix=out_prefix,
    )


@task(name="report", cache_policy=NO_CACHE, **io_retries)
def make_report(artefact_root: str, inputs: report.ReportInputs) -> str:
    return report.make_report(ArtefactStore(artefact_root), inputs)
