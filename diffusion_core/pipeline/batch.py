"""Bounded concurrency for the artefact store's directory transfers: many files in flight at once
(on S3 each file is one request, so a directory of small files is bound by round trips), at most
``DIFFPIPE_STORE_CONCURRENCY`` at a time, and the first failure stops the batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

from diffusion_core.settings import settings

T = TypeVar("T")


def run_all(jobs: Sequence[Callable[[], T]], *, concurrency: int | None = None) -> list[T]:
    """Call every job, at most ``concurrency`` at a time (unset: the settings'
    ``store_concurrency``); the results in job order.

    The first failure (the earliest job among those that failed by then) is raised once the jobs
    already running have finished; jobs not yet started are cancelled. With ``concurrency`` 1 the
    jobs run one after another in this thread.
    """
    if concurrency is None:
        concurrency = settings().store_concurrency
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if concurrency == 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(jobs)), thread_name_prefix="store")
    try:
        futures = [pool.submit(job) for job in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and (exc := future.exception()) is not None:
                raise exc
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
