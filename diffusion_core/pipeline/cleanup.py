"""What a killed run leaves behind, removed when the next run starts.

A process killed while it writes leaves its staging behind: ``.tmp-*`` folders of a checkpoint
being written (``diffusion_core.io.atomic_dir``) in a training work directory, and ``.tmp``
folders of files being stored (``ArtefactStore``, local roots) under its run's prefixes. Readers
never see them; they only take disk space. Each is removed only where no live process can be
writing: a training directory whose lock is free, and the prefixes of a run whose process is
gone (its MLflow run was found ``RUNNING`` with no process behind it).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from diffusion_core.io import STAGING_PREFIX
from diffusion_core.pipeline.layout import TMP_DIR, RunLayout
from diffusion_core.pipeline.lock import LockHeld, hold
from diffusion_core.pipeline.store import ArtefactStore

log = logging.getLogger(__name__)


def _remove(paths: list[Path]) -> list[Path]:
    removed = []
    for path in sorted(paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue  # inside a folder removed before it
        removed.append(path)
    return removed


def remove_stale_staging(work_dir: Path) -> list[Path]:
    """The ``.tmp-*`` staging left in each training directory under ``work_dir`` whose lock is
    free (no live run trains there), removed; what was removed."""
    removed: list[Path] = []
    for local in sorted(work_dir.glob("train-*")):
        if not local.is_dir():
            continue
        lock = local.with_name(local.name + ".lock")
        try:
            with hold(lock, what=f"training directory {local}", owner={"cleanup": True}):
                removed += _remove(list(local.rglob(f"{STAGING_PREFIX}*")))
        except LockHeld:
            continue  # a live run trains there: its staging is in use
    for path in removed:
        log.info("removed %s, left by a run that was killed while it wrote a checkpoint", path)
    return removed


def remove_run_staging(store: ArtefactStore, run_id: str) -> list[Path]:
    """The ``.tmp`` staging under the prefixes of run ``run_id`` (a run whose process is gone),
    removed from a local store (S3 stages nothing); what was removed."""
    if not store.local:
        return []
    removed: list[Path] = []
    for layout in (RunLayout.pipeline_run(run_id), RunLayout.evaluation(run_id)):
        root = store.local_path(layout.root)
        if root.is_dir():
            removed += _remove([p for p in root.rglob(TMP_DIR) if p.name == TMP_DIR])
    for path in removed:
        log.info("removed %s, left by run %s when it was killed", path, run_id)
    return removed
