"""The temporary Prefect API of one ``diffpipe run`` or ``diffpipe evaluate`` (when no
``PREFECT_API_URL`` names a server), which never outlives the command.

Prefect starts such a server by itself as a plain child process, which a ``kill -9`` of the
command leaves running for ever (with its port and its SQLite database). This one is the same
server (uvicorn serving ``prefect.server.api.server:create_app``, as Prefect runs it), started by
the command, which also watches the command: when its parent process is gone, however it went,
it stops within a second. The command stops it when it ends, after Prefect's log and event
workers have sent what they hold.

``python -m diffpipe.flows.server PARENT_PID PORT`` is the server process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("diffpipe")

# What Prefect sets for its own temporary server: no UI, the server's ephemeral mode.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
WATCH_INTERVAL_S = 0.5  # how often the server looks for its parent
STOP_GRACE_S = 10.0  # how long a stopping server may take before it is killed


class ServerError(RuntimeError):
    """The temporary Prefect server did not start; the message names its log file."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(process: subprocess.Popen[bytes], url: str, log_file: Path) -> None:
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"the temporary Prefect server exited with code {process.returncode}; "
                f"its log: {log_file}"
            )
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.2)
    raise ServerError(f"the temporary Prefect server did not answer in {timeout:g} s: {log_file}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _drain() -> None:
    """Let Prefect's log and event workers send what they hold while the server still runs (a
    failure to is logged: the command's own outcome is the one to report)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        with contextlib.suppress(RuntimeError):  # a worker that never started
            APILogWorker.instance().drain()
        EventsWorker.drain_all()
    except Exception as exc:
        log.warning("Prefect's log and event workers did not finish sending: %s", exc)


@contextlib.contextmanager
def temporary_server(log_dir: Path) -> Iterator[str | None]:
    """A Prefect API for the block: None when Prefect's settings name one already, else the URL
    of a server started here (its output in ``log_dir``), stopped when the block ends and, should
    this process be killed, when the server finds its parent gone."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    current = get_current_settings()
    if current.api.url:
        yield None
        return
    port, parent = _free_port(), os.getpid()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"prefect-server-{parent}.log"
    env = {**os.environ, **current.to_environment_variables(exclude_unset=True), **SERVER_ENV}
    with open(log_file, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "diffpipe.flows.server", str(parent), str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches the command, which then stops it
        )
    url = f"http://127.0.0.1:{port}/api"
    saved = os.environ.get("PREFECT_API_URL")
    try:
        _wait_until_up(process, url, log_file)
        log.info("temporary Prefect server on %s (pid %d)", url, process.pid)
        os.environ["PREFECT_API_URL"] = url  # for the processes the run starts
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain()
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        _stop(process)


def _watch(parent: int) -> None:
    """Stop this process once ``parent`` is gone (this process is then someone else's child)."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down
    time.sleep(STOP_GRACE_S)
    os._exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parent, port = (int(v) for v in (argv if argv is not None else sys.argv[1:])[:2])
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
