"""Faults, each ending in a known state: a store that refuses, stalls or answers 500 fails the
operation with the URL in bounded tries; a full disk fails with a message; kill -9 in training
resumes exactly; a killed run leaves no server behind and its MLflow run is closed on the next
start; a run that fails after registration leaves no challenger."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diffusion_core.pipeline.errors import ArtefactNotFoundError, StorageError
from diffusion_core.pipeline.store import ArtefactStore
from tests.conftest import free_port
from tests.faults import FaultyProxy

BUCKET = "diffpipe-fault-tests"
HANG_GUARD_S = 120  # far above any bound below: only a hang reaches it


# ----------------------------------------------------------------------------------------------
# The store: refused, stalled, 500s.


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """moto's S3 server on loopback with one bucket, and the AWS environment it needs."""
    import boto3
    from moto.server import ThreadedMotoServer

    aws = tmp_path_factory.mktemp("aws")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(aws / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws / "credentials"))
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
        try:
            yield host, port
        finally:
            server.stop()


@pytest.fixture
def proxy(moto: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyProxy]:
    """A faulty proxy in front of moto, as the endpoint; short timeouts, two tries a request."""
    monkeypatch.setenv("DIFFPIPE_STORE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("DIFFPIPE_STORE_READ_TIMEOUT", "1")
    monkeypatch.setenv("DIFFPIPE_STORE_ATTEMPTS", "2")
    with FaultyProxy(moto) as faulty:
        monkeypatch.setenv("AWS_ENDPOINT_URL", faulty.endpoint)
        yield faulty


def guarded(operation: Callable[[], Any]) -> BaseException | None:
    """What ``operation`` raised (None: nothing), run in a thread so that a hang fails the test
    instead of stopping the suite."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            operation()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_GUARD_S)
    assert not worker.is_alive(), "the store operation hung"
    return raised[0]


def chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


@pytest.mark.parametrize(
    ("mode", "cause"),
    [("stall", "ReadTimeoutError"), ("error", "InternalError"), ("refuse", "")],
)
def test_a_faulty_endpoint_fails_each_operation_naming_the_url(
    proxy: FaultyProxy, tmp_path: Path, mode: str, cause: str
) -> None:
    """Every request is tried DIFFPIPE_STORE_ATTEMPTS times, each bounded by the timeouts,
    then the operation fails with a StorageError naming the URL, which the tasks retry."""
    from diffpipe.tasks.steps import transient

    store = ArtefactStore(f"s3://{BUCKET}/{uuid.uuid4().hex}")
    store.put_bytes("kept.bin", b"kept")  # through the proxy while it forwards
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    proxy.mode = mode
    operations: dict[str, Callable[[], Any]] = {
        "put_bytes": lambda: store.put_bytes("new.bin", b"x"),
        "get_bytes": lambda: store.get_bytes("kept.bin"),
        "list": lambda: store.list(""),
        "put_dir": lambda: store.put_dir("dir", src),
    }
    for name, operation in operations.items():
        before = proxy.connections.get(mode, 0)
        exc = guarded(operation)
        assert isinstance(exc, StorageError), (name, exc)
        assert not isinstance(exc, ArtefactNotFoundError), name
        assert exc.url.startswith(store.root) and exc.url in str(exc), name
        assert transient(exc), name  # the task retries it
        if cause:
            assert cause in " ".join(f"{type(e).__name__} {e}" for e in chain(exc)), name
        if mode == "stall":  # each try opens a connection and waits one read timeout
            assert proxy.connections[mode] - before == 2, name
    # Nothing new became visible.
    proxy.mode = "forward"
    assert store.list("") == ["kept.bin"]
    assert not store.exists_dir("dir")


def test_botocore_timeouts_and_refusals_are_transient() -> None:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
    from diffpipe.tasks.steps import transient

    url = "http://127.0.0.1:9/bucket/key"
    assert transient(ReadTimeoutError(endpoint_url=url))
    assert transient(ConnectTimeoutError(endpoint_url=url))
    assert transient(EndpointConnectionError(endpoint_url=url))
    assert not transient(ValueError("bad data"))
    assert not transient(ArtefactNotFoundError("get_bytes", url, "not found"))


# ----------------------------------------------------------------------------------------------
# A full disk.


def test_a_full_disk_fails_the_write_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while a checkpoint directory is committed to a local store: a StorageError naming
    the file's URL and "No space left on device"; the directory stays uncommitted, no staged
    temporary is left behind."""
    import builtins

    store = ArtefactStore(str(tmp_path / "store"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(os.urandom(4096))
    (src / "card.json").write_bytes(b"{}")
    real_open = builtins.open

    class FullDisk:
        """A file whose writes fail as on a full disk."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        inside = str(file).startswith(str(tmp_path / "store"))
        return FullDisk(handle) if inside and "w" in mode else handle

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(StorageError, match="No space left on device") as info:
        store.put_dir("runs/r1/checkpoint", src)
    monkeypatch.undo()
    assert info.value.url.startswith(store.url("runs/r1/checkpoint/"))
    assert not store.exists_dir("runs/r1/checkpoint")
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert leftovers == []
