"""Where the bulk tasks run: Prefect's thread runner in the flow's process, or a Dask cluster
(an existing scheduler, or a local cluster started for the run) through prefect-dask."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from diffusion_core.config import TaskRunnerConfig


def task_runner(cfg: TaskRunnerConfig) -> Any:
    """The Prefect task runner ``runtime.task_runner`` describes."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    resources = {"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else None
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.n_workers,
            "threads_per_worker": cfg.threads_per_worker,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            **({"resources": resources} if resources else {}),
        }
    )


@contextlib.contextmanager
def one_gpu_each(cfg: TaskRunnerConfig) -> Iterator[None]:
    """Around the submission of GPU tasks: on a Dask cluster whose workers offer GPUs, each task
    holds one, so no two tasks share a GPU."""
    if cfg.kind != "dask" or not cfg.gpus_per_worker:
        yield
        return
    import dask

    with dask.annotate(resources={"GPU": 1}):
        yield
