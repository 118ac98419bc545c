"""MLflow after a failure: runs whose process was killed are closed on the next start, and a
version registered by a run that then failed is taken back.

Every pipeline run is tagged with the process that runs it (``diffpipe.pid`` on
``diffpipe.host``). A run still ``RUNNING`` whose process is gone from this host was killed
(``kill -9``, a lost machine): nothing will ever end it, so the next run of the same flow and
experiment on this host marks it ``KILLED``. A run on another host is left alone (its process
cannot be seen from here), and so is a run whose process id is in use again.
"""

from __future__ import annotations

import logging
import os
import socket

from diffpipe.tasks.tracking import CHALLENGER, CHAMPION, ModelRef, client

log = logging.getLogger(__name__)

PID_TAG, HOST_TAG = "diffpipe.pid", "diffpipe.host"
FAILED_TAG = "diffpipe.failed"  # on a version whose registering run failed: why
KILLED_TAG = "diffpipe.killed"  # on a run closed because its process was gone


def process_tags() -> dict[str, str]:
    """The tags that name this process (a run's owner)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def close_stale_runs(uri: str, experiment: str, flow: str) -> list[str]:
    """Mark ``KILLED`` the runs of ``flow`` in ``experiment`` that are still ``RUNNING`` but
    whose process on this host is gone; their ids."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found = c.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`diffpipe.flow` = '{flow}'",
    )
    host, closed = socket.gethostname(), []
    for run in found:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or running(int(pid)):
            continue
        c.set_tag(run.info.run_id, KILLED_TAG, f"process {pid} on {host} was gone")
        c.set_terminated(run.info.run_id, status="KILLED")
        log.warning(
            "run %s (%s) was left RUNNING by process %s, which is gone: marked KILLED",
            run.info.run_id,
            run.info.run_name,
            pid,
        )
        closed.append(run.info.run_id)
    return closed


def retract(
    uri: str, model: ModelRef, reason: str, *, promoted: bool, champion_before: str | None
) -> None:
    """Take back ``model``, registered by a run that then failed: tag it ``diffpipe.failed``
    with ``reason``, remove its ``challenger`` alias, and, when the run had made it champion,
    give the alias back to the version it replaced (remove it when there was none)."""
    c = client(uri)
    c.set_model_version_tag(model.name, model.version, FAILED_TAG, reason[:4000])
    aliases = c.get_model_version(model.name, model.version).aliases
    if CHALLENGER in aliases:
        c.delete_registered_model_alias(model.name, CHALLENGER)
    if promoted and CHAMPION in aliases:
        if champion_before is None:
            c.delete_registered_model_alias(model.name, CHAMPION)
        else:
            c.set_registered_model_alias(model.name, CHAMPION, champion_before)
    log.warning("%s: its run failed, so it is no longer %s (%s)", model.uri, CHALLENGER, reason)
