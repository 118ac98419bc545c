"""Artefact store on local disk and on S3 (a local moto server); everything offline."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from diffusion_core.io import sha256_bytes, sha256_file
from diffusion_core.pipeline import store as storage
from diffusion_core.pipeline.errors import ArtefactNotFoundError, IntegrityError, StorageError
from diffusion_core.pipeline.store import (
    MANIFEST,
    ArtefactRecord,
    ArtefactStore,
    default_root,
    s3_storage_options,
)
from tests.conftest import free_port

BUCKET = "diffpipe-storage-tests"
FAST_FAIL = {"connect_timeout": 1, "read_timeout": 2, "retries": {"total_max_attempts": 1}}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback with one bucket; ``AWS_ENDPOINT_URL`` points at it."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import boto3

    no_config = tmp_path_factory.mktemp("aws")
    server = server_module.ThreadedMotoServer(
        ip_address="127.0.0.1", port=free_port(), verbose=False
    )
    server.start()
    with pytest.MonkeyPatch.context() as env:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(no_config / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_config / "credentials"))
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        # botocore would read AWS_ENDPOINT_URL by itself; turn that off so the store must pass it
        env.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            server.stop()


class Raw:
    """Access to the stored objects behind the store's back (a separate client)."""

    def __init__(self, store: ArtefactStore, endpoint: str | None) -> None:
        self.store = store
        self.endpoint = endpoint
        if store.local:
            self.base = Path(store.root.removeprefix("file://"))
        else:
            import boto3

            self.client = boto3.client("s3", endpoint_url=endpoint)
            self.prefix = store.root.removeprefix(f"s3://{BUCKET}/")

    def put(self, key: str, data: bytes) -> None:
        if self.store.local:
            path = self.base / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.client.put_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}", Body=data)

    def listing(self) -> list[str]:
        """Every stored file under the root, ``.tmp`` entries included."""
        if self.store.local:
            if not self.base.exists():
                return []
            return sorted(
                p.relative_to(self.base).as_posix() for p in self.base.rglob("*") if p.is_file()
            )
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=self.prefix + "/"
        )
        return sorted(
            obj["Key"][len(self.prefix) + 1 :] for page in pages for obj in page.get("Contents", [])
        )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ArtefactStore, Raw]:
    if request.param == "local":
        store = ArtefactStore(str(tmp_path / "artefacts"))
        return store, Raw(store, None)
    endpoint = request.getfixturevalue("s3_endpoint")
    # no storage options: the endpoint comes from AWS_ENDPOINT_URL
    store = ArtefactStore(f"s3://{BUCKET}/{uuid.uuid4().hex}")
    return store, Raw(store, endpoint)


@pytest.fixture
def store(backend: tuple[ArtefactStore, Raw]) -> ArtefactStore:
    return backend[0]


@pytest.fixture
def raw(backend: tuple[ArtefactStore, Raw]) -> Raw:
    return backend[1]


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


TREE = {
    "model.safetensors": os.urandom(3000),
    "config.json": b'{"steps": 6}',
    "ema/model.safetensors": os.urandom(1500),
    "empty.txt": b"",
}


# ----------------------------------------------------------------------------- round trips


def test_bytes_round_trip(store: ArtefactStore, raw: Raw) -> None:
    data = os.urandom(4096)
    record = store.put_bytes("runs/r1/blob.bin", data)
    assert record == ArtefactRecord(
        url=store.url("runs", "r1/blob.bin"), sha256=hashlib.sha256(data).hexdigest(), size=4096
    )
    assert record.url == f"{store.root}/runs/r1/blob.bin"
    assert store.get_bytes("runs/r1/blob.bin") == data
    assert store.get_bytes("runs/r1/blob.bin", sha256=record.sha256) == data
    assert store.exists("runs/r1/blob.bin")
    assert not store.exists("runs/r1/other.bin")
    assert not store.exists("runs/r1")  # a folder is not an artefact
    assert store.list("runs") == ["runs/r1/blob.bin"]
    assert store.list("run") == []  # prefixes are whole path parts
    assert raw.listing() == ["runs/r1/blob.bin"]  # nothing else left behind (no .tmp)

    store.put_bytes("runs/r1/blob.bin", b"new")  # overwrite
    assert store.get_bytes("runs/r1/blob.bin") == b"new"


def test_file_and_json_round_trip(store: ArtefactStore, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(10_000))
    record = store.put_file("ckpt/step-3.bin", source)
    assert record.sha256 == sha256_file(source) == sha256_bytes(source.read_bytes())
    assert record.size == 10_000 and record.url == store.url("ckpt/step-3.bin")

    out = tmp_path / "out" / "copy.bin"
    fetched = store.get_file("ckpt/step-3.bin", out, sha256=record.sha256)
    assert out.read_bytes() == source.read_bytes() and fetched == record

    doc = {"b": [1, 2.5, None], "a": "ü"}
    store.write_json("runs/r1/metrics.json", doc)
    assert store.read_json("runs/r1/metrics.json") == doc
    assert sorted(store.list()) == ["ckpt/step-3.bin", "runs/r1/metrics.json"]


def test_dir_round_trip_and_manifest(store: ArtefactStore, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "ckpt", TREE)
    records = store.put_dir("runs/r1/ckpt", src)
    assert [r.url for r in records] == [store.url("runs/r1/ckpt", rel) for rel in sorted(TREE)]
    assert store.exists_dir("runs/r1/ckpt")

    manifest = store.read_json(f"runs/r1/ckpt/{MANIFEST}")
    assert set(manifest) == {"files", "created"}
    assert manifest["files"] == {
        rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for rel, data in TREE.items()
    }
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None

    dest = tmp_path / "fetched"
    fetched = store.get_dir("runs/r1/ckpt", dest)
    assert [r.sha256 for r in fetched] == [r.sha256 for r in records]
    assert {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
    } == TREE
    assert store.list("runs/r1/ckpt") == sorted(
        [f"runs/r1/ckpt/{rel}" for rel in TREE] + [f"runs/r1/ckpt/{MANIFEST}"]
    )


def test_rewriting_a_dir_replaces_it_and_drops_stale_files(
    store: ArtefactStore, tmp_path: Path
) -> None:
    store.put_dir("report", make_tree(tmp_path / "v1", {"a.txt": b"one", "b.txt": b"bee"}))
    store.put_dir("report/nested", make_tree(tmp_path / "n", {"x.txt": b"x"}))
    store.put_dir("report", make_tree(tmp_path / "v2", {"a.txt": b"two", "c/d.txt": b"dee"}))
    assert store.list("report") == [
        "report/a.txt",
        "report/c/d.txt",
        f"report/{MANIFEST}",
        "report/nested/manifest.json",
        "report/nested/x.txt",
    ]
    assert store.exists_dir("report/nested")  # only the old manifest's files are dropped
    store.get_dir("report", tmp_path / "out")
    assert (tmp_path / "out/a.txt").read_bytes() == b"two"
    assert not (tmp_path / "out/b.txt").exists()


def test_empty_dir_commits(store: ArtefactStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert store.put_dir("nothing", tmp_path / "empty") == []
    assert store.exists_dir("nothing")
    assert store.get_dir("nothing", tmp_path / "out") == []


def test_delete(store: ArtefactStore, raw: Raw, tmp_path: Path) -> None:
    store.put_dir("runs/r1/ckpt", make_tree(tmp_path / "ckpt", TREE))
    store.put_bytes("runs/r10/keep.bin", b"k")
    store.delete("runs/r1")
    assert not store.exists_dir("runs/r1/ckpt")
    assert raw.listing() == ["runs/r10/keep.bin"]
    store.delete("runs/r1")  # missing: no error
    store.delete("runs/r10/keep.bin")
    assert store.list() == []


# ----------------------------------------------------------------------------- integrity


def test_tampered_object_raises_integrity_error(store: ArtefactStore, raw: Raw) -> None:
    record = store.put_bytes("samples/shard-0.npz", b"original bytes")
    raw.put("samples/shard-0.npz", b"tampered bytes")
    with pytest.raises(IntegrityError) as info:
        store.get_bytes("samples/shard-0.npz", sha256=record.sha256)
    message = str(info.value)
    actual = sha256_bytes(b"tampered bytes")
    assert record.url in message and record.sha256 in message and actual in message
    assert (info.value.url, info.value.expected, info.value.actual) == (
        record.url,
        record.sha256,
        actual,
    )
    assert isinstance(info.value, StorageError)
    assert store.get_bytes("samples/shard-0.npz") == b"tampered bytes"  # unchecked read


def test_get_dir_verifies_each_file(store: ArtefactStore, raw: Raw, tmp_path: Path) -> None:
    store.put_dir("ckpt", make_tree(tmp_path / "src", TREE))
    tampered = bytearray(TREE["model.safetensors"])
    tampered[100] ^= 0xFF  # same size, different content
    raw.put("ckpt/model.safetensors", bytes(tampered))
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError) as info:
        store.get_dir("ckpt", dest)
    assert info.value.url == store.url("ckpt/model.safetensors")
    assert store.url("ckpt/model.safetensors") in str(info.value)
    # the corrupt file never lands, and no partial download is left
    assert not (dest / "model.safetensors").exists()
    assert not [p for p in dest.rglob("*") if p.name.startswith(".")]


def test_get_dir_checks_sizes(store: ArtefactStore, raw: Raw, tmp_path: Path) -> None:
    store.put_dir("ckpt", make_tree(tmp_path / "src", {"a.bin": b"abc"}))
    raw.put("ckpt/a.bin", b"abcd")
    with pytest.raises(IntegrityError, match=r"a\.bin: size mismatch: expected 3, actual 4"):
        store.get_dir("ckpt", tmp_path / "dest")


def test_dir_without_manifest_is_invisible(store: ArtefactStore, raw: Raw, tmp_path: Path) -> None:
    raw.put("ckpt/model.safetensors", b"weights")
    assert store.list("ckpt") == ["ckpt/model.safetensors"]
    assert not store.exists_dir("ckpt")
    with pytest.raises(ArtefactNotFoundError, match=re.escape(store.url("ckpt"))):
        store.get_dir("ckpt", tmp_path / "dest")
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_missing_artefact_names_the_url(store: ArtefactStore, tmp_path: Path) -> None:
    with pytest.raises(ArtefactNotFoundError) as info:
        store.get_bytes("no/such.bin")
    assert info.value.url == store.url("no/such.bin") and info.value.operation == "get_bytes"
    assert store.url("no/such.bin") in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(ArtefactNotFoundError, match=re.escape(store.url("no/such.json"))):
        store.read_json("no/such.json")
    with pytest.raises(ArtefactNotFoundError, match=re.escape(store.url("no/such.bin"))):
        store.get_file("no/such.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert store.list("no") == []


def test_malformed_manifest_is_a_storage_error(
    store: ArtefactStore, raw: Raw, tmp_path: Path
) -> None:
    raw.put(f"bad/{MANIFEST}", b'{"files": {"../../etc/passwd": {"sha256": "x", "size": 1}}}')
    with pytest.raises(StorageError, match="bad path"):
        store.get_dir("bad", tmp_path / "dest")
    raw.put(f"worse/{MANIFEST}", b"not json")
    with pytest.raises(StorageError, match="invalid JSON"):
        store.get_dir("worse", tmp_path / "dest")


# ----------------------------------------------------------------------------- atomicity


def _fail_on_call(n: int, original: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    """Wrap ``original`` so that its ``n``-th call (1-based) raises ``exc``."""
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(*args, **kwargs)

    return wrapper


def _fail_for(
    path_end: str, original: Callable[..., Any], exc: BaseException
) -> Callable[..., Any]:
    """Wrap ``original`` so that a call whose second argument (the destination) ends with
    ``path_end`` raises ``exc``: the same file fails whatever order concurrent calls come in."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.fspath(args[1]).endswith(path_end):
            raise exc
        return original(*args, **kwargs)

    return wrapper


def break_file_commit(store: ArtefactStore, monkeypatch: pytest.MonkeyPatch, rel: str) -> None:
    """Make the commit of the file ``rel`` fail after its data was sent."""
    if store.local:
        # the temporary is written and fsync-ed; the rename into place fails
        monkeypatch.setattr(os, "replace", _fail_for(f"/{rel}", os.replace, OSError(5, "gone")))
    else:
        fs = store.fs
        failing = _fail_for(f"/{rel}", fs.put_file, ConnectionResetError("reset by peer"))
        monkeypatch.setattr(fs, "put_file", failing)


def test_failed_put_bytes_leaves_nothing(
    store: ArtefactStore, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.local:
        monkeypatch.setattr(os, "replace", _fail_on_call(1, os.replace, OSError(5, "disk gone")))
    else:
        monkeypatch.setattr(
            store.fs, "pipe_file", _fail_on_call(1, store.fs.pipe_file, TimeoutError("timed out"))
        )
    with pytest.raises(StorageError, match=re.escape(store.url("a/b.bin"))) as info:
        store.put_bytes("a/b.bin", b"payload")
    assert info.value.operation == "put_bytes" and info.value.__cause__ is not None
    assert raw.listing() == []
    assert not store.exists("a/b.bin")


def test_put_dir_failing_midway_commits_nothing(
    store: ArtefactStore, raw: Raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src", TREE)
    rels = sorted(TREE)
    break_file_commit(store, monkeypatch, rels[1])
    with pytest.raises(StorageError) as info:
        store.put_dir("ckpt", src)
    assert info.value.url == store.url("ckpt", rels[1])
    assert info.value.__cause__ is not None
    keys = raw.listing()
    assert f"ckpt/{rels[1]}" not in keys  # no final object for the failed file
    assert f"ckpt/{MANIFEST}" not in keys  # and no manifest
    assert not [k for k in keys if ".tmp" in k]  # temporaries were cleaned up
    assert not store.exists_dir("ckpt")
    with pytest.raises(ArtefactNotFoundError):
        store.get_dir("ckpt", tmp_path / "dest")

    # a retry succeeds and commits the directory
    monkeypatch.undo()
    store.put_dir("ckpt", src)
    assert store.exists_dir("ckpt")


class InFlight:
    """Wraps a store method to count its calls and the most that ran at the same time."""

    def __init__(self, original: Callable[..., Any], *, hold: float = 0.01) -> None:
        self.original, self.hold = original, hold
        self.calls = self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.hold)  # keep the call open long enough for others to start
            return self.original(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


MANY = {f"img/{i:05d}.png": os.urandom(i % 7 * 100) for i in range(120)}


@pytest.mark.parametrize("concurrency", [1, 6])
def test_batched_dir_round_trip_is_bounded(
    backend: tuple[ArtefactStore, Raw],
    concurrency: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many files per call, never more than ``DIFFPIPE_STORE_CONCURRENCY`` at once (read when a
    directory moves); the same directory as one file at a time would give."""
    store = backend[0]
    monkeypatch.setenv("DIFFPIPE_STORE_CONCURRENCY", str(concurrency))
    puts, gets = InFlight(store.put_file), InFlight(store.get_file)
    monkeypatch.setattr(store, "put_file", puts)
    monkeypatch.setattr(store, "get_file", gets)
    records = store.put_dir("many", make_tree(tmp_path / "src", MANY))
    assert [r.url for r in records] == [store.url("many", rel) for rel in sorted(MANY)]
    fetched = store.get_dir("many", tmp_path / "dest")
    assert [(r.sha256, r.size) for r in fetched] == [(r.sha256, r.size) for r in records]
    for rel, data in MANY.items():
        assert (tmp_path / "dest" / rel).read_bytes() == data
    assert puts.calls == gets.calls == len(MANY)
    if concurrency == 1:
        assert puts.most == gets.most == 1
    else:
        assert 1 < puts.most <= concurrency and 1 < gets.most <= concurrency


def test_a_failure_in_the_middle_of_a_batch_leaves_the_dir_uncommitted(
    backend: tuple[ArtefactStore, Raw], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, raw = backend
    monkeypatch.setenv("DIFFPIPE_STORE_CONCURRENCY", "4")
    store.put_dir("many", make_tree(tmp_path / "old", {"old.bin": b"old version"}))
    rels = sorted(MANY)
    break_file_commit(store, monkeypatch, rels[60])
    puts = InFlight(store.put_file, hold=0.0)
    monkeypatch.setattr(store, "put_file", puts)
    with pytest.raises(StorageError) as info:
        store.put_dir("many", make_tree(tmp_path / "src", MANY))
    assert info.value.url == store.url("many", rels[60]) and info.value.operation == "put_file"
    assert info.value.__cause__ is not None
    assert puts.calls < len(MANY)  # the files not yet started were never sent
    keys = raw.listing()
    assert f"many/{MANIFEST}" not in keys and f"many/{rels[60]}" not in keys
    assert not [k for k in keys if ".tmp" in k]
    assert not store.exists_dir("many")  # neither the old version nor a half-new one
    with pytest.raises(ArtefactNotFoundError):
        store.get_dir("many", tmp_path / "dest")
    monkeypatch.undo()
    store.put_dir("many", tmp_path / "src")  # a retry commits the whole directory
    assert set(store.read_manifest("many")["files"]) == set(MANY)


def test_a_bad_file_in_a_batched_read_fails_it(
    store: ArtefactStore, raw: Raw, tmp_path: Path
) -> None:
    store.put_dir("many", make_tree(tmp_path / "src", MANY))
    raw.put(f"many/{sorted(MANY)[70]}", b"tampered")
    with pytest.raises(IntegrityError, match=re.escape(store.url("many", sorted(MANY)[70]))):
        store.get_dir("many", tmp_path / "dest")
    assert not (tmp_path / "dest" / sorted(MANY)[70]).exists()


def test_manifest_write_failing_leaves_dir_uncommitted(
    store: ArtefactStore, raw: Raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src", TREE)
    store.put_dir("ckpt", make_tree(tmp_path / "old", {"old.bin": b"old"}))
    # the manifest is the only put_bytes of put_dir; fail it
    monkeypatch.setattr(
        store,
        "put_bytes",
        _fail_on_call(1, store.put_bytes, StorageError("put_bytes", "manifest", "boom")),
    )
    with pytest.raises(StorageError):
        store.put_dir("ckpt", src)
    assert f"ckpt/{MANIFEST}" not in raw.listing()
    assert not store.exists_dir("ckpt")  # neither the old nor the half-new version is visible


def test_staging_folder_removed_by_another_writer_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent writes share a folder's ``.tmp``, and the last one out removes it. A writer
    whose ``mkdir`` found it there, but gone by the time it looked (FileExistsError from
    ``mkdir(exist_ok=True)``), tries again instead of failing the write."""
    store = ArtefactStore(str(tmp_path / "artefacts"))
    real_mkdir, raced = os.mkdir, []

    def mkdir_losing_a_race(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == ".tmp" and not raced:
            raced.append(path)  # another writer made it and its last user removed it again
            raise FileExistsError(17, "File exists", str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir_losing_a_race)
    store.put_bytes("ckpt/a.bin", b"a")
    assert raced and store.get_bytes("ckpt/a.bin") == b"a"


def test_local_write_goes_through_a_hidden_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtefactStore(str(tmp_path / "artefacts"))
    store.put_bytes("ckpt/other.bin", b"x")
    seen: list[tuple[bool, list[str], list[str]]] = []
    real_fsync = os.fsync

    def observing_fsync(fd: int) -> None:
        real_fsync(fd)
        if not seen:  # the data file's fsync, before the rename
            on_disk = [
                p.relative_to(tmp_path / "artefacts").as_posix()
                for p in (tmp_path / "artefacts").rglob("*")
                if p.is_file()
            ]
            seen.append((store.exists("ckpt/model.bin"), store.list(), on_disk))

    monkeypatch.setattr(os, "fsync", observing_fsync)
    store.put_bytes("ckpt/model.bin", b"weights" * 1000)
    monkeypatch.undo()
    exists_during, listed_during, on_disk_during = seen[0]
    assert not exists_during
    assert listed_during == ["ckpt/other.bin"]
    assert [p for p in on_disk_during if p.startswith("ckpt/.tmp/")], on_disk_during
    assert [p for p in on_disk_during if p.startswith("ckpt/.tmp/.model.bin.tmp-")]
    assert store.get_bytes("ckpt/model.bin") == b"weights" * 1000
    assert not (tmp_path / "artefacts/ckpt/.tmp").exists()  # tidied after the commit


def test_tmp_entries_are_never_listed(store: ArtefactStore, raw: Raw, tmp_path: Path) -> None:
    raw.put(".tmp/abc-stray.bin", b"in flight")
    raw.put("ckpt/.tmp/def-model.bin", b"half")
    store.put_bytes("ckpt/model.bin", b"whole")
    assert store.list() == ["ckpt/model.bin"]
    assert store.list("ckpt") == ["ckpt/model.bin"]

    src = make_tree(tmp_path / "src", {"a.bin": b"a", ".tmp/junk.bin": b"junk"})
    store.put_dir("dir", src)
    assert store.list("dir") == ["dir/a.bin", f"dir/{MANIFEST}"]
    assert set(store.read_json(f"dir/{MANIFEST}")["files"]) == {"a.bin"}
    with pytest.raises(ValueError, match=r"\.tmp"):
        store.put_bytes("ckpt/.tmp/x", b"")
    with pytest.raises(ValueError, match=r"\.tmp"):
        store.get_bytes(".tmp/abc-stray.bin")


# ----------------------------------------------------------------------------- failures


def test_unreachable_server_raises_storage_error_naming_the_url(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    store = ArtefactStore(
        f"s3://{BUCKET}/{uuid.uuid4().hex}",
        storage_options={"endpoint_url": f"http://{host}:{port}", "config_kwargs": FAST_FAIL},
    )
    # one file after another, so that the server stops between them
    monkeypatch.setenv("DIFFPIPE_STORE_CONCURRENCY", "1")
    try:
        store.put_bytes("kept.bin", b"kept")
        # the server goes away in the middle of put_dir, after the first file
        real_put_file = store.fs.put_file
        calls = []

        def put_then_stop(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            out = real_put_file(*args, **kwargs)
            if len(calls) == 1:
                server.stop()
            return out

        monkeypatch.setattr(store.fs, "put_file", put_then_stop)
        src = make_tree(tmp_path / "src", {"a.bin": b"a", "b.bin": b"b"})
        with pytest.raises(StorageError) as info:
            store.put_dir("ckpt", src)
    finally:
        server.stop()
    assert info.value.url == store.url("ckpt/b.bin")
    assert store.url("ckpt/b.bin") in str(info.value)
    assert info.value.__cause__ is not None
    assert not isinstance(info.value, ArtefactNotFoundError)

    # moto keeps its state in-process: the module's server shows what was stored
    seen = ArtefactStore(store.root)
    assert seen.list() == ["ckpt/a.bin", "kept.bin"]
    assert not seen.exists_dir("ckpt")

    operations: dict[str, Callable[[], Any]] = {
        "get_bytes": lambda: store.get_bytes("kept.bin"),
        "put_bytes": lambda: store.put_bytes("new.bin", b"x"),
        "exists": lambda: store.exists("kept.bin"),
        "list": lambda: store.list("ckpt"),
        "get_dir": lambda: store.get_dir("ckpt", tmp_path / "dest"),
    }
    for name, operation in operations.items():
        with pytest.raises(StorageError) as info:
            operation()
        assert info.value.url.startswith(store.root), name
        assert info.value.url in str(info.value) and name in str(info.value)
        assert info.value.__cause__ is not None, name
        assert not isinstance(info.value, ArtefactNotFoundError), name


def test_local_io_failure_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = ArtefactStore(str(blocker / "artefacts"))  # a folder below a regular file
    with pytest.raises(StorageError, match=re.escape(store.url("a.bin"))) as info:
        store.put_bytes("a.bin", b"x")
    assert isinstance(info.value.__cause__, OSError)


def test_bad_local_sources(tmp_path: Path) -> None:
    store = ArtefactStore(str(tmp_path / "artefacts"))
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        store.put_file("a.bin", tmp_path / "missing.bin")
    with pytest.raises(NotADirectoryError):
        store.put_dir("d", tmp_path / "missing")
    make_tree(tmp_path / "src", {MANIFEST: b"{}"})
    with pytest.raises(ValueError, match="reserved"):
        store.put_dir("d", tmp_path / "src")


def test_errors_survive_pickling() -> None:
    err = pickle.loads(pickle.dumps(StorageError("get_bytes", "s3://b/k", "boom")))
    assert (err.operation, err.url, str(err)) == (
        "get_bytes",
        "s3://b/k",
        "get_bytes s3://b/k: boom",
    )
    integrity = pickle.loads(pickle.dumps(IntegrityError("get_dir", "file:///x", "aa", "bb")))
    assert isinstance(integrity, IntegrityError)
    assert (integrity.url, integrity.expected, integrity.actual) == ("file:///x", "aa", "bb")
    assert "expected aa, actual bb" in str(integrity)


# ----------------------------------------------------------------------------- configuration


def test_urls_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = ArtefactStore("rel/artefacts")
    assert local.root == f"file://{tmp_path}/rel/artefacts" and local.local
    assert ArtefactStore(f"file://{tmp_path}/x/").root == f"file://{tmp_path}/x"
    assert local.url() == local.root
    assert local.url("runs", "r1/ckpt", "model.pt") == f"{local.root}/runs/r1/ckpt/model.pt"
    s3 = ArtefactStore("s3://bucket/some/prefix/")
    assert s3.root == "s3://bucket/some/prefix" and not s3.local
    assert s3.url("a//b/") == "s3://bucket/some/prefix/a/b"
    for bad in ("../up", "/abs", "a/../b", "a/.tmp/b", ""):
        with pytest.raises(ValueError):
            local.put_bytes(bad, b"")
    with pytest.raises(ValueError, match="bucket"):
        ArtefactStore("s3://")
    with pytest.raises(ValueError, match="unsupported"):
        ArtefactStore("ftp://host/dir")


def test_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFPIPE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == f"file://{tmp_path}/.diffpipe/artefacts"
    monkeypatch.setenv("DIFFPIPE_HOME", "home")
    assert default_root() == f"file://{tmp_path}/home/artefacts"
    store = ArtefactStore(default_root())
    store.put_bytes("x.txt", b"x")
    assert (tmp_path / "home/artefacts/x.txt").read_bytes() == b"x"


def test_s3_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    plain = s3_storage_options(None)
    assert "endpoint_url" not in plain  # AWS: botocore's checksums, the settings' bounds
    assert plain["config_kwargs"] == {
        "connect_timeout": 10.0,
        "read_timeout": 60.0,
        "retries": {"total_max_attempts": 3, "mode": "standard"},
    }
    assert plain["use_listings_cache"] is False and plain["skip_instance_cache"] is True

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("DIFFPIPE_STORE_READ_TIMEOUT", "5")
    opts = s3_storage_options({"config_kwargs": {"connect_timeout": 1}})
    assert opts["endpoint_url"] == "http://127.0.0.1:9000"
    assert opts["config_kwargs"] == {
        "connect_timeout": 1,
        "read_timeout": 5.0,
        "retries": {"total_max_attempts": 3, "mode": "standard"},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    explicit = s3_storage_options(
        {
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9001"},
            "config_kwargs": {"request_checksum_calculation": "when_supported"},
        }
    )
    assert "endpoint_url" not in explicit  # the explicit endpoint wins over the environment
    assert explicit["config_kwargs"]["request_checksum_calculation"] == "when_supported"
    assert explicit["config_kwargs"]["response_checksum_validation"] == "when_required"

    store = ArtefactStore("s3://bucket/prefix")
    assert store.fs.config_kwargs["request_checksum_calculation"] == "when_required"
    assert store.fs.endpoint_url == "http://127.0.0.1:9000"
    assert store.fs.retries == 1  # botocore's tries only


def test_filesystem_is_rebuilt_in_a_new_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtefactStore(str(tmp_path))
    fs = store.fs
    assert store.fs is fs
    monkeypatch.setattr(storage.os, "getpid", lambda: -42)  # as seen from a forked child
    assert store.fs is not fs
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root == store.root and clone._fs is None


def test_store_pickles_after_use(store: ArtefactStore) -> None:
    store.put_bytes("a.txt", b"a")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get_bytes("a.txt") == b"a"
    assert clone.list() == ["a.txt"]


def _child_reads(store: ArtefactStore, key: str, queue: Any) -> None:
    queue.put(store.get_bytes(key))


def test_store_used_after_fork(store: ArtefactStore) -> None:
    import multiprocessing

    store.put_bytes("forked.txt", b"parent wrote this")
    assert store.get_bytes("forked.txt") == b"parent wrote this"  # filesystem in use
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(store, "forked.txt", queue))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == b"parent wrote this"
