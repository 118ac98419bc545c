"""Artefact store: every artefact of a pipeline run lives under one root URL.

The root is a local directory (``file:///abs/path`` or a plain path, made absolute) or an S3
prefix (``s3://bucket/prefix``; AWS S3, MinIO or another S3-compatible server). Artefacts are
addressed by *keys*: ``/``-separated paths relative to the root, e.g. ``runs/r1/ckpt/model.pt``.

Atomicity: no reader ever sees half an artefact.

* **Local files** are written to a temporary in ``<dir>/.tmp/`` beside their final path,
  ``fsync``-ed, then moved into place with :func:`os.replace` (``diffusion_core.io.atomic_path``).
* **S3** objects are written with one direct PUT (s3fs switches to a multipart upload above
  ~100 MiB). S3 makes a PUT visible only when it has fully succeeded, and a multipart upload
  only on ``CompleteMultipartUpload``, so readers see the old object or the whole new one.
  A temporary key plus server-side copy would add a second full write and a window in which
  a crashed writer leaves orphaned temporary objects, without any stronger guarantee.
* **Directories** (checkpoints, sample shard sets, reports) are committed by writing
  ``manifest.json`` *last*: ``{"files": {"rel/path": {"sha256": ..., "size": ...}},
  "created": <ISO time>}``. A directory without its manifest does not exist for readers
  (:meth:`ArtefactStore.exists_dir` is False, :meth:`ArtefactStore.get_dir` raises).
  Rewriting a committed directory first removes its manifest, so readers never mix versions.

``.tmp`` entries (in-flight or left by a crashed writer) are never returned by
:meth:`ArtefactStore.list` and never part of a manifest; keys may not contain a ``.tmp`` part.

Errors: I/O failures (including transient ones: connection refused, timeouts) raise
:class:`StorageError`, naming the operation and URL, with the original exception chained.
A missing artefact raises :class:`ArtefactNotFoundError` and a checksum mismatch
:class:`IntegrityError`; both are StorageErrors. Retrying them is pointless, so a Prefect
retry condition can be ``isinstance(exc, StorageError) and not isinstance(exc,
(ArtefactNotFoundError, IntegrityError))``.

S3: see ``diffusion_core.pipeline.s3`` for the options a store uses (timeouts and tries bound
every request). s3fs is not fork-safe; the store recreates its filesystem when it finds itself in
a new process.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import fsspec

from diffusion_core.config import diffpipe_home
from diffusion_core.io import atomic_path, sha256_bytes, sha256_file
from diffusion_core.pipeline.batch import run_all
from diffusion_core.pipeline.errors import (
    ArtefactNotFoundError,
    IntegrityError,
    StorageError,
    io_errors,
    translate_io,
)
from diffusion_core.pipeline.layout import MANIFEST, TMP_DIR, check_key, check_rel, is_tmp
from diffusion_core.pipeline.s3 import s3_storage_options
from diffusion_core.remote import bounded

logger = logging.getLogger(__name__)

_CHUNK = 8 * 2**20
_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local")


# ----------------------------------------------------------------------------- records, hashes


@dataclass(frozen=True)
class ArtefactRecord:
    """Where an artefact was stored, its sha256 (hex) and size in bytes."""

    url: str
    sha256: str
    size: int


def default_root() -> str:
    """``file://$DIFFPIPE_HOME/artefacts``."""
    return "file://" + str(diffpipe_home() / "artefacts")


# ----------------------------------------------------------------------------- the store


class ArtefactStore:
    """Artefacts under one root URL (local folder or ``s3://bucket/prefix``).

    ``storage_options`` go to the fsspec filesystem (for S3 see :func:`s3_storage_options`).
    Keys are ``/``-separated paths relative to the root.
    """

    def __init__(self, root: str, *, storage_options: dict[str, Any] | None = None) -> None:
        if not root:
            raise ValueError("artefact store root is empty")
        protocol, path = fsspec.core.split_protocol(root)
        protocol = protocol or "file"
        if protocol in _LOCAL_PROTOCOLS:
            base = os.path.abspath(os.path.expanduser(path)).rstrip("/") or "/"
            self.local = True
            self.root = "file://" + base
            self._base = base
            self._options = dict(storage_options or {})
        elif protocol in _S3_PROTOCOLS:
            base = path.strip("/")
            if not base:
                raise ValueError(f"S3 artefact root needs a bucket: {root!r}")
            self.local = False
            self.root = f"{protocol}://{base}"
            self._base = base
            self._options = s3_storage_options(storage_options)
        else:
            raise ValueError(
                f"unsupported artefact store URL {root!r}: use a local path, file:// or s3://"
            )
        self._protocol = "file" if self.local else protocol
        self._fs: Any = None
        self._pid = -1

    def __repr__(self) -> str:
        return f"ArtefactStore({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None  # filesystems hold sockets and event loops; rebuild after unpickling
        state["_pid"] = -1
        return state

    @property
    def fs(self) -> Any:
        """The fsspec filesystem; rebuilt in a new process (s3fs is not fork-safe)."""
        if self._fs is None or self._pid != os.getpid():
            self._fs = bounded(fsspec.filesystem(self._protocol, **self._options))
            self._pid = os.getpid()
        return self._fs

    # ------------------------------------------------------------------ addressing

    def url(self, *parts: str) -> str:
        """URL of the key made of ``parts`` (each may contain ``/``); the root when empty."""
        key = check_key("/".join(parts), allow_empty=True)
        return f"{self.root}/{key}" if key else self.root

    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options of the store's filesystem."""
        return dict(self._options)

    def local_path(self, key: str) -> Path:
        """The local path of ``key`` (a local store only)."""
        if not self.local:
            raise ValueError(f"{self.root} is not a local store")
        return Path(self._path(check_key(key, allow_empty=True)))

    def _local_tmp(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """An atomic write of a local key, staged in its folder's ``.tmp`` (which listings skip)."""
        final = Path(self._path(key))
        return atomic_path(final, staging=final.parent / TMP_DIR)

    def _path(self, key: str) -> str:
        """Filesystem path (no protocol) of a normalised key."""
        return f"{self._base.rstrip('/')}/{key}" if key else self._base

    def _key_of(self, path: str) -> str:
        path = path.split("://", 1)[-1]
        base = self._base.rstrip("/") + "/"
        return path[len(base) :] if path.startswith(base) else path

    # ------------------------------------------------------------------ queries

    def exists(self, key: str) -> bool:
        """True when a file (object) is stored at ``key``."""
        return self._exists(check_key(key), "exists")

    def exists_dir(self, prefix: str) -> bool:
        """True when the directory at ``prefix`` was committed (its manifest exists)."""
        return self._exists(posixpath.join(check_key(prefix), MANIFEST), "exists_dir")

    def _exists(self, key: str, operation: str) -> bool:
        with translate_io(operation, self.url(key)):
            try:
                info = self.fs.info(self._path(key))
            except (FileNotFoundError, NotADirectoryError):
                return False
        return bool(info.get("type") == "file")

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of every file under ``prefix`` (or ``prefix`` itself when it is a file),
        leaving out ``.tmp`` entries."""
        prefix = check_key(prefix, allow_empty=True)
        path = self._path(prefix)
        with translate_io("list", self.url(prefix)):
            try:
                found = self.fs.find(path, withdirs=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
        keys = []
        for item in found:
            key = self._key_of(item)
            inside = not prefix or key == prefix or key.startswith(prefix + "/")
            if inside and not is_tmp(key):
                keys.append(key)
        return sorted(keys)

    # ------------------------------------------------------------------ writes

    def put_bytes(self, key: str, data: bytes) -> ArtefactRecord:
        """Store ``data`` at ``key`` atomically; returns its record."""
        key = check_key(key)
        url = self.url(key)
        data = bytes(data)
        record = ArtefactRecord(url=url, sha256=sha256_bytes(data), size=len(data))
        with translate_io("put_bytes", url):
            if self.local:
                with self._local_tmp(key) as tmp:
                    tmp.write_bytes(data)
            else:
                self.fs.pipe_file(self._path(key), data)
                self.fs.invalidate_cache(self._path(key))
        logger.debug("stored %s (%d bytes)", url, record.size)
        return record

    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> ArtefactRecord:
        """Store the local file ``local_path`` at ``key`` atomically; returns its record."""
        key = check_key(key)
        url = self.url(key)
        source = os.fspath(local_path)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"put_file {url}: no local file {source}")
        if self.local:
            digest, size = hashlib.sha256(), 0
            with (
                translate_io("put_file", url),
                self._local_tmp(key) as tmp,
                open(source, "rb") as src,
                open(tmp, "wb") as dst,
            ):
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            record = ArtefactRecord(url=url, sha256=digest.hexdigest(), size=size)
        else:
            record = ArtefactRecord(
                url=url, sha256=sha256_file(source), size=os.path.getsize(source)
            )
            with translate_io("put_file", url):
                self.fs.put_file(source, self._path(key))
                self.fs.invalidate_cache(self._path(key))
        logger.debug("stored %s from %s (%d bytes)", url, source, record.size)
        return record

    def write_json(self, key: str, obj: Any) -> ArtefactRecord:
        """Store ``obj`` as indented, key-sorted JSON at ``key`` (atomically)."""
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
        return self.put_bytes(key, text.encode())

    def put_dir(
        self, prefix: str, local_dir: str | os.PathLike[str]
    ) -> builtins.list[ArtefactRecord]:
        """Store every file under ``local_dir`` below ``prefix``, many at once (``run_all``), then
        commit the directory by writing its manifest last. Returns the files' records, sorted by
        relative path.

        An existing directory at ``prefix`` is uncommitted (manifest removed) first; after the
        commit, files of the old manifest that are not in the new one are removed. Other keys
        under ``prefix`` are left alone. ``.tmp`` folders in ``local_dir`` are skipped; a
        top-level ``manifest.json`` is refused.
        """
        prefix = check_key(prefix)
        source = Path(local_dir)
        url = self.url(prefix)
        if not source.is_dir():
            raise NotADirectoryError(f"put_dir {url}: no local folder {source}")
        rels = []
        for folder, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d != TMP_DIR)
            for name in files:
                rels.append(Path(folder, name).relative_to(source).as_posix())
        rels.sort()
        if MANIFEST in rels:
            raise ValueError(f"put_dir {url}: {source} has its own {MANIFEST} (reserved name)")

        manifest_key = f"{prefix}/{MANIFEST}"
        try:
            old_files = set(self.read_manifest(prefix, operation="put_dir")["files"])
        except ArtefactNotFoundError:
            old_files = set()
        except StorageError as exc:
            if isinstance(exc.__cause__, io_errors()):
                raise  # an I/O failure, not a bad manifest
            logger.warning("put_dir %s: replacing an unreadable manifest (%s)", url, exc)
            old_files = set()
        # readers stop seeing an old version before any of its files change
        self._remove_file(manifest_key, "put_dir")
        records = run_all([partial(self.put_file, f"{prefix}/{rel}", source / rel) for rel in rels])
        manifest = {
            "files": {
                rel: {"sha256": rec.sha256, "size": rec.size}
                for rel, rec in zip(rels, records, strict=True)
            },
            "created": datetime.now(UTC).isoformat(),
        }
        self.write_json(manifest_key, manifest)

        for rel in sorted(old_files - set(rels)):
            self._remove_file(f"{prefix}/{rel}", "put_dir")
        logger.info("committed %s (%d files)", url, len(records))
        return records

    # ------------------------------------------------------------------ reads

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """Content at ``key``; with ``sha256`` given, raises IntegrityError when it differs."""
        key = check_key(key)
        data = self._cat(key, "get_bytes")
        if sha256 is not None:
            actual = sha256_bytes(data)
            if actual != sha256.lower():
                raise IntegrityError("get_bytes", self.url(key), sha256, actual)
        return data

    def read_json(self, key: str) -> Any:
        """The JSON document stored at ``key``."""
        return self._read_json(check_key(key), "read_json")

    def _cat(self, key: str, operation: str) -> bytes:
        with translate_io(operation, self.url(key)):
            return bytes(self.fs.cat_file(self._path(key)))

    def _read_json(self, key: str, operation: str) -> Any:
        data = self._cat(key, operation)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(operation, self.url(key), f"invalid JSON: {exc}") from exc

    def get_file(
        self,
        key: str,
        local_path: str | os.PathLike[str],
        *,
        sha256: str | None = None,
        size: int | None = None,
    ) -> ArtefactRecord:
        """Download ``key`` to ``local_path``, verifying ``sha256``/``size`` when given.

        The download goes to a hidden temporary next to ``local_path`` and replaces it only
        once complete and verified, so a failed or corrupt download never lands there.
        """
        key = check_key(key)
        url = self.url(key)
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        count = 0
        try:
            with (
                translate_io("get_file", url),
                self.fs.open(self._path(key), "rb") as src,
                open(tmp, "wb") as dst,
            ):
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    count += len(chunk)
                    dst.write(chunk)
            actual = digest.hexdigest()
            if size is not None and count != size:
                raise IntegrityError("get_file", url, str(size), str(count), what="size")
            if sha256 is not None and actual != sha256.lower():
                raise IntegrityError("get_file", url, sha256, actual)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return ArtefactRecord(url=url, sha256=actual, size=count)

    def read_manifest(self, prefix: str, *, operation: str = "read_manifest") -> dict[str, Any]:
        """The manifest of the committed directory at ``prefix``.

        Raises ArtefactNotFoundError when the directory was never committed.
        """
        prefix = check_key(prefix)
        manifest_key = f"{prefix}/{MANIFEST}"
        url = self.url(manifest_key)
        try:
            manifest = self._read_json(manifest_key, operation)
        except ArtefactNotFoundError as exc:
            raise ArtefactNotFoundError(
                operation, self.url(prefix), f"not committed (no {MANIFEST})"
            ) from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("sha256"), str)
            and isinstance(v.get("size"), int)
            for v in files.values()
        ):
            raise StorageError(operation, url, "malformed manifest")
        for rel in files:
            if not isinstance(rel, str) or check_rel(rel) != rel:
                raise StorageError(operation, url, f"bad path in manifest: {rel!r}")
        return manifest

    def get_dir(
        self, prefix: str, local_dir: str | os.PathLike[str]
    ) -> builtins.list[ArtefactRecord]:
        """Download every file in the manifest of ``prefix`` into ``local_dir``, many at once,
        verifying each sha256 and size. Raises ArtefactNotFoundError when ``prefix``
        was never committed, IntegrityError when a file differs from its manifest entry."""
        prefix = check_key(prefix)
        manifest = self.read_manifest(prefix, operation="get_dir")
        target = Path(local_dir)
        target.mkdir(parents=True, exist_ok=True)
        gets = [
            partial(
                self.get_file, f"{prefix}/{rel}", target / rel, sha256=e["sha256"], size=e["size"]
            )
            for rel, e in sorted(manifest["files"].items())
        ]
        records = run_all(gets)
        logger.debug("fetched %s (%d files) into %s", self.url(prefix), len(records), target)
        return records

    # ------------------------------------------------------------------ deletes

    def delete(self, prefix: str) -> None:
        """Remove the file at ``prefix`` or everything under it; missing is not an error.

        A directory's manifest is removed first, so it stops being visible before its files go.
        """
        prefix = check_key(prefix)
        url = self.url(prefix)
        path = self._path(prefix)
        self._remove_file(f"{prefix}/{MANIFEST}", "delete")
        with translate_io("delete", url):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)
            self.fs.invalidate_cache(path)
        logger.debug("deleted %s", url)

    def _remove_file(self, key: str, operation: str) -> None:
        """Remove one file; missing (or a file where a folder was expected) is not an error."""
        with (
            translate_io(operation, self.url(key)),
            contextlib.suppress(FileNotFoundError, NotADirectoryError),
        ):
            self.fs.rm_file(self._path(key))
            self.fs.invalidate_cache(self._path(key))
