"""The pipeline's Prefect tasks: each a short typed adapter over one ``diffusion_core`` stage.

Tasks take typed objects (config sections, stage references) and return stage references: URLs,
prefixes and small summaries, never tensors or models. Retries (with backoff) apply only to
storage and network I/O: a ``StorageError`` that is not a missing artefact or a checksum mismatch.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from diffusion_core import data as data_sources
from diffusion_core.config import (
    DataConfig,
    EvaluationConfig,
    InpaintEvalConfig,
    RunConfig,
    RuntimeConfig,
    SafetyConfig,
    WatermarkConfig,
)
from diffusion_core.pipeline.errors import ArtefactNotFoundError, IntegrityError, StorageError
from diffusion_core.pipeline.layout import CACHE_PREFIX
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
    artefact or a checksum mismatch), a refused or timed-out connection (Python's, requests',
    or botocore's: a connect or read timeout, an endpoint that cannot be reached)."""
    if isinstance(exc, ArtefactNotFoundError | IntegrityError):
        return False
    if isinstance(exc, StorageError | ConnectionError | TimeoutError):
        return True
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError  # ReadTimeoutError among them
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout

    return isinstance(
        exc, RequestsConnectionError | Timeout | BotoConnectionError | HTTPClientError
    )


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
def prepare_dataset(data: DataConfig, artefact_root: str, fingerprint: str) -> dataset.DatasetRef:
    return dataset.prepare_dataset(data, ArtefactStore(artefact_root), fingerprint)


@task(name="fingerprint-source", cache_policy=NO_CACHE, **io_retries)
def source_fingerprint(data: DataConfig) -> str:
    """What the data source holds now (one listing): part of the prepare step's cache key."""
    return data_sources.source_fingerprint(data)


@task(name="cache-storage", cache_policy=NO_CACHE, **io_retries)
def cache_storage(artefact_root: str, data: DataConfig, fingerprint: str) -> tuple[Any, bool]:
    """Where cached task results live: beside the artefacts, so every host that shares the
    store shares the cache (a local folder, or a saved ``RemoteFileSystem`` block for object
    storage); and whether the dataset a cache entry would point to is still committed."""
    store = ArtefactStore(artefact_root)
    committed = store.exists_dir(dataset.stored_prefix(data, fingerprint))
    if store.local:
        return store.local_path(CACHE_PREFIX), committed
    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(basepath=store.url(CACHE_PREFIX), settings=store.storage_options)
    name = "diffpipe-cache-" + hashlib.sha256(store.root.encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block, committed


def prepare_dataset_cached(data: DataConfig, artefact_root: str) -> tuple[dataset.DatasetRef, bool]:
    """prepare_dataset with its cache on the artefact store; the dataset and whether it came from
    the cache. The cache key holds the source's fingerprint, so new, changed or deleted files
    are prepared again. A cached result is reused only while its dataset is still committed in
    the store (an entry outliving a deleted or unreachable dataset is refreshed)."""
    fingerprint = source_fingerprint(data)
    storage, committed = cache_storage(artefact_root, data, fingerprint)
    # The cache records live with the results (one file a key) in the shared storage.
    shared = prepare_dataset.with_options(result_storage=storage, refresh_cache=not committed)
    state = shared(data, artefact_root, fingerprint, return_state=True)
    return state.result(), state.name == "Cached"


@task(name="train", task_run_name="train-{checkpoint_prefix}", cache_policy=NO_CACHE, **io_retries)
def train_model(
    config: RunConfig,
    data: dataset.DatasetRef,
    artefact_root: str,
    checkpoint_prefix: str,
    work_dir: str,
    parent: train.Parent | None = None,
) -> train.CheckpointRef:
    return train.train_model(
        config,
        data,
        ArtefactStore(artefact_root),
        checkpoint_prefix=checkpoint_prefix,
        work_dir=Path(work_dir),
        parent=parent,
    )


@task(name="sample", task_run_name="sample-shard-{shard}", cache_policy=NO_CACHE, **io_retries)
def sample_shard(
    artefact_root: str,
    checkpoint_prefix: str,
    request: SampleRequest,
    out_prefix: str,
    shard: int,
    shard_size: int,
    runtime: RuntimeConfig,
) -> sample.ShardRef:
    return sample.sample_shard(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        request,
        out_prefix=out_prefix,
        shard=shard,
        shard_size=shard_size,
        runtime=runtime,
    )


@task(name="safety-filter", cache_policy=NO_CACHE, **io_retries)
def safety_filter(
    artefact_root: str,
    shards: list[sample.ShardRef],
    data: dataset.DatasetRef,
    out_prefix: str,
    config: SafetyConfig,
    runtime: RuntimeConfig,
) -> safety.SafetyRef:
    return safety.safety_filter(
        ArtefactStore(artefact_root),
        [s.prefix for s in shards],
        data,
        out_prefix=out_prefix,
        safety=config,
        runtime=runtime,
    )


@task(name="side-by-side", cache_policy=NO_CACHE, **io_retries)
def side_by_side(
    artefact_root: str,
    challenger_prefix: str,
    champion_prefix: str,
    request: SampleRequest,
    out_prefix: str,
) -> str:
    """A few samples of the challenger and the champion, same seeds and labels, for the report."""
    return sample.side_by_side(
        ArtefactStore(artefact_root),
        challenger_prefix,
        champion_prefix,
        request,
        out_prefix=f"{out_prefix}/side_by_side",
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
    runtime: RuntimeConfig,
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
        runtime=runtime,
        safety_rates=published.rates(),
    )


@task(name="sweep", cache_policy=NO_CACHE, **io_retries)
def sweep_samplers(
    artefact_root: str,
    checkpoint_prefix: str,
    data: dataset.DatasetRef,
    request: SampleRequest,
    config: EvaluationConfig,
    out_prefix: str,
    runtime: RuntimeConfig,
) -> sweep.SweepRef:
    """Quality against sampling cost over ``config.sweep``."""
    return sweep.sweep_samplers(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        data,
        request=request,
        evaluation=config,
        out_prefix=out_prefix,
        runtime=runtime,
    )


@task(name="inpaint-evaluate", cache_policy=NO_CACHE, **io_retries)
def evaluate_inpainting(
    artefact_root: str,
    checkpoint_prefix: str,
    data: dataset.DatasetRef,
    request: SampleRequest,
    config: InpaintEvalConfig,
    out_prefix: str,
    runtime: RuntimeConfig,
) -> inpaint.InpaintEvaluation:
    return inpaint.evaluate_inpainting(
        ArtefactStore(artefact_root),
        checkpoint_prefix,
        data,
        request=request,
        config=config,
        out_prefix=out_prefix,
        runtime=runtime,
    )


@task(name="report", cache_policy=NO_CACHE, **io_retries)
def make_report(artefact_root: str, inputs: report.ReportInputs) -> str:
    return report.make_report(ArtefactStore(artefact_root), inputs)
