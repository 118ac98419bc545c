"""One live run at a time: an advisory file lock (``flock``) that the operating system releases
when its holder exits, however it exits (a crash or ``kill -9`` leaves no stale lock). The lock
file names its holder, so the run that waits or gives up can say who holds it.

Used for a model on one ``DIFFPIPE_HOME`` (two nightly runs of one model never overlap) and for
a training work directory (two live runs never train into one directory). On a Prefect server,
the nightly deployment's concurrency limit does the same across machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


def holder_text(holder: dict[str, Any]) -> str:
    parts = [f"{k} {holder[k]}" for k in ("run", "flow_run_id") if holder.get(k)]
    where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f"since {holder['since']}" if holder.get("since") else ""
    return ", ".join(p for p in (*parts, where, since) if p)


@contextlib.contextmanager
def hold(path: Path, *, what: str, owner: dict[str, Any], wait: float = 0.0) -> Iterator[None]:
    """Hold the lock file ``path`` while the block runs; wait up to ``wait`` seconds for it,
    then LockHeld naming ``what`` and the run that holds it (``owner`` is what this run writes
    into the file for others to read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read(fd)
                    waited = f" after waiting {wait:g} s" if wait else ""
                    raise LockHeld(
                        f"{what} is in use by another run ({holder_text(holder)}){waited}; "
                        f"wait for it to finish (lock file {path})"
                    ) from None
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        record = {
            **owner,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
