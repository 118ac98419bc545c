"""Where images come from: scikit-learn's digits (offline), image folders on any fsspec URL (one
class per sub-folder, or flat; captions from ``captions.csv`` / ``captions.jsonl``), and
torchvision's MNIST, FashionMNIST and CIFAR-10 from a local root."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

from diffusion_core.config import DataConfig
from diffusion_core.data.dataset import DatasetError, ImageDataset, match_channels, resize_uint8
from diffusion_core.io import CONVERT, ImageReadError, image_tensor, open_image
from diffusion_core.remote import bounded
from diffusion_core.settings import settings

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
CAPTION_FILES = ("captions.csv", "captions.jsonl")
_READ_BATCH = 256  # files fetched per fsspec ``cat_ranges`` call
_NAMED_SKIPS = 5  # how many skipped files a warning names


# ----------------------------------------------------------------------------- digits


def load_digits(cfg: DataConfig) -> ImageDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, offline), resized to image_size."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    grey = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0))
    images = resize_uint8(grey.unsqueeze(1), cfg.image_size)
    return ImageDataset(
        images=match_channels(images, cfg.channels),
        labels=torch.as_tensor(np.asarray(bunch.target), dtype=torch.long),
        class_names=[str(d) for d in range(10)],
        source="sklearn.datasets.load_digits",
    )


# ----------------------------------------------------------------------------- image folder


def _storage_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Copy of ``storage_options``; for s3 URLs, ``AWS_ENDPOINT_URL`` fills in the endpoint and
    the settings' timeouts and tries bound every request (``config_kwargs`` win)."""
    options = dict(storage_options or {})
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol not in ("s3", "s3a"):
        return options
    current = settings()
    client_kwargs = options.get("client_kwargs") or {}
    if (
        current.aws_endpoint_url
        and "endpoint_url" not in options
        and "endpoint_url" not in client_kwargs
    ):
        options["endpoint_url"] = current.aws_endpoint_url
    options["config_kwargs"] = current.s3_config() | dict(options.get("config_kwargs") or {})
    return options


def _filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The filesystem and path of ``url`` (S3 requests bounded: ``diffusion_core.remote``)."""
    fs, root = fsspec.core.url_to_fs(url, **_storage_options(url, storage_options))
    return bounded(fs), root


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(path: str) -> bool:
    return posixpath.basename(path.rstrip("/")).startswith(".")


def _is_folder(fs: fsspec.AbstractFileSystem, entry: dict[str, Any]) -> bool:
    """A folder, or (local disk) a symbolic link to one, which fsspec lists as "other"."""
    return entry["type"] == "directory" or bool(entry.get("islink") and fs.isdir(entry["name"]))


def _list_images(
    fs: fsspec.AbstractFileSystem, root: str, *, accept: Callable[[str], bool] = _is_image
) -> tuple[list[str], list[int], list[str]]:
    """Image paths (or other files that ``accept`` takes) under ``root`` with labels and class
    names.

    Sub-folders holding images are classes (labels follow sorted folder names); without any,
    images directly in ``root`` form an unlabelled set and the class list is empty.
    """
    entries = [e for e in fs.ls(root, detail=True) if not _is_hidden(e["name"])]
    folders = [e["name"] for e in entries if _is_folder(fs, e)]
    classes: dict[str, list[str]] = {}
    for folder in folders:
        found = sorted(p for p in fs.find(folder) if accept(p) and not _is_hidden(p))
        if found:
            classes[posixpath.basename(folder.rstrip("/"))] = found
    loose = sorted(e["name"] for e in entries if e["name"] not in folders and accept(e["name"]))
    if not classes:
        return loose, [], []
    if loose:
        logger.warning("%s: ignoring %d image(s) outside the class sub-folders", root, len(loose))
    names = sorted(classes)
    paths = [p for name in names for p in classes[name]]
    labels = [label for label, name in enumerate(names) for _ in classes[name]]
    return paths, labels, names


def read_all(fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> Iterable[tuple[str, Any]]:
    """(path, bytes or the exception raised while reading it), in ``paths`` order.

    ``cat_ranges`` takes paths literally (``cat`` would treat "[1]" in a name as a glob) and
    fetches each batch concurrently on object stores.
    """
    for start in range(0, len(paths), _READ_BATCH):
        batch = list(paths[start : start + _READ_BATCH])
        try:
            blobs = fs.cat_ranges(batch, None, None, on_error="return")
        except NotImplementedError:
            blobs = [_read_one(fs, path) for path in batch]
        yield from zip(batch, blobs, strict=True)


def _read_one(fs: fsspec.AbstractFileSystem, path: str) -> bytes | OSError:
    try:
        return fs.cat_file(path)
    except OSError as exc:
        return exc


def _parse_captions_csv(text: str, where: str) -> dict[str, str]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        fields = reader.fieldnames or []
        if "file" not in fields or "caption" not in fields:
            raise DatasetError(f"{where}: needs columns 'file' and 'caption', found {fields}")
        return {row["file"]: row["caption"] or "" for row in reader if row.get("file")}
    except csv.Error as exc:  # a NUL byte, a field over the csv module's limit, ...
        raise DatasetError(f"{where}:{reader.line_num}: not readable CSV ({exc})") from None


def _parse_captions_jsonl(text: str, where: str) -> dict[str, str]:
    captions: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}:{number}: not valid JSON: {exc.msg}") from None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("file"), str)
            and isinstance(record.get("caption"), str)
        ):
            raise DatasetError(
                f'{where}:{number}: expected {{"file": str, "caption": str}}, got {line.strip()!r}'
            )
        captions[record["file"]] = record["caption"]
    return captions


def _read_captions(
    fs: fsspec.AbstractFileSystem, root: str, url: str, follow_symlinks: bool = False
) -> dict[str, str] | None:
    """The root's captions file as {file: caption}, or None when there is none."""
    present = [name for name in CAPTION_FILES if fs.isfile(posixpath.join(root, name))]
    if not present:
        return None
    if len(present) > 1:
        raise DatasetError(f"{url}: found both {' and '.join(present)}; keep one")
    name = present[0]
    if not follow_symlinks:
        check_links(fs, root, [posixpath.join(root, name)])
    where = posixpath.join(url.rstrip("/"), name)
    try:
        text = fs.cat_file(posixpath.join(root, name)).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{where}: not UTF-8 text") from None
    if name.endswith(".csv"):
        return _parse_captions_csv(text, where)
    return _parse_captions_jsonl(text, where)


def _escapes(key: str) -> bool:
    """A captions row whose file lies outside the root (absolute, or climbing out with ``..``)."""
    normal = posixpath.normpath(key.replace("\\", "/"))
    return normal.startswith("/") or normal == ".." or normal.startswith("../")


def unmatched_captions(table: dict[str, str], relpaths: Sequence[str]) -> list[str]:
    """The captions rows that name no image in the folder (``relpaths``: every listed image,
    relative to the root): a path outside the root, or a file that is not there (by its
    relative path or, failing that, its file name). Each is named with why."""
    names = {posixpath.basename(rel) for rel in relpaths}
    listed = set(relpaths)
    out = []
    for key in table:
        if _escapes(key):
            out.append(f"{key} (outside the root)")
        elif key not in listed and posixpath.basename(key) not in names:
            out.append(f"{key} (no such image)")
    return out


def _match_captions(table: dict[str, str], relpaths: Sequence[str], url: str) -> list[str]:
    """One caption per image: keyed by path relative to the root, else by file name (rows that
    point outside the root are never used)."""
    table = {key: caption for key, caption in table.items() if not _escapes(key)}
    by_name: dict[str, str | None] = {}
    for key, caption in table.items():
        name = posixpath.basename(key)
        by_name[name] = caption if name not in by_name else None  # None marks an ambiguous name
    captions: list[str] = []
    missing = 0
    for rel in relpaths:
        found = table.get(rel)
        if found is None:
            found = by_name.get(posixpath.basename(rel))
        if found is None:
            missing += 1
        captions.append(found or "")
    if missing:
        logger.warning("%s: %d image(s) have no caption; using empty captions", url, missing)
    return captions


def report_skips(url: str, skipped: list[str], what: str = "unreadable image file(s)") -> None:
    if not skipped:
        return
    named = ", ".join(skipped[:_NAMED_SKIPS]) + (", ..." if len(skipped) > _NAMED_SKIPS else "")
    logger.warning("%s: skipped %d %s: %s", url, len(skipped), what, named)


def _outside_link(path: str, root: str) -> str | None:
    """The symbolic link on the way from ``root`` to ``path`` (local paths) whose target lies
    outside ``root``, or None when ``path`` resolves inside it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) == real_root:
        return None
    parts = posixpath.relpath(path, root).split("/")
    for depth in range(1, len(parts) + 1):
        step = posixpath.join(root, *parts[:depth])
        if os.path.islink(step):
            return step
    return path


def check_links(fs: fsspec.AbstractFileSystem, root: str, paths: Sequence[str]) -> None:
    """Refuse files of a local folder reached through a symbolic link that leaves ``root``: a
    DatasetError naming the link and where it points (``data.follow_symlinks`` allows them)."""
    if "file" not in getattr(fs, "protocol", ()):
        return
    for path in paths:
        link = _outside_link(path, root)
        if link is not None:
            raise DatasetError(
                f"{link}: a symbolic link to {os.path.realpath(link)}, outside data.root "
                f"{root}; remove it, or set data.follow_symlinks: true to read it"
            )


def source_fingerprint(cfg: DataConfig) -> str:
    """What the data's source holds now, cheaply: the sha256 of one recursive listing of
    ``cfg.root`` (any fsspec URL: relative names, sizes, and modification times or ETags), so
    adding, changing or deleting a file changes it and the same contents keep it. Built-in
    sources (no root) are fixed: ``builtin:<kind>``. A missing root is a DatasetError."""
    if not cfg.root:
        return f"builtin:{cfg.kind}"
    url = str(cfg.root)
    fs, root = _filesystem(url, None)
    root = root.rstrip("/") or root
    try:
        if not fs.isdir(root):
            kind = "not a folder" if fs.exists(root) else "not found"
            raise DatasetError(f"{url}: data.root {kind}")
        entries = fs.find(root, detail=True, withdirs=False)
    except OSError as exc:
        raise DatasetError(f"{url}: cannot list data.root: {exc}") from exc
    digest = hashlib.sha256()
    for path, info in sorted(entries.items()):
        stamp = next(
            (info[k] for k in ("ETag", "etag", "mtime", "LastModified") if info.get(k) is not None),
            None,
        )
        rel = posixpath.relpath(path, root)
        digest.update(json.dumps([rel, info.get("size"), str(stamp)]).encode() + b"\n")
    return digest.hexdigest()


def list_folder(
    url: str,
    what: str,
    *,
    accept: Callable[[str], bool] = _is_image,
    storage_options: dict[str, Any] | None = None,
    follow_symlinks: bool = False,
) -> tuple[fsspec.AbstractFileSystem, str, list[str], list[int], list[str]]:
    """The filesystem and root of the ``what`` folder at ``url``, and its files that ``accept``
    takes, with labels and class names (see ``_list_images``); a missing or unlistable folder is
    a DatasetError naming the URL, and so is a file reached through a symbolic link that leaves
    the folder, unless ``follow_symlinks``."""
    fs, root = _filesystem(url, storage_options)
    root = root.rstrip("/") or root
    if not fs.isdir(root):
        kind = "not a folder" if fs.exists(root) else "not found"
        raise DatasetError(f"{url}: {what} folder {kind}")
    try:
        paths, labels, class_names = _list_images(fs, root, accept=accept)
    except OSError as exc:
        raise DatasetError(f"{url}: cannot list the {what} folder: {exc}") from exc
    if not follow_symlinks:
        check_links(fs, root, paths)
    return fs, root, paths, labels, class_names


def load_folder(cfg: DataConfig, *, storage_options: dict[str, Any] | None = None) -> ImageDataset:
    """Images under ``cfg.root`` (any fsspec URL), one class per sub-folder or a flat folder.

    Unreadable files, and captions rows that name no image of the folder (missing, or outside
    the root), are skipped, counted and named in the log. ``storage_options`` go to the
    filesystem; for s3 URLs the ``AWS_ENDPOINT_URL`` environment variable sets the endpoint
    when given.
    """
    url = str(cfg.root)
    fs, root, paths, labels, class_names = list_folder(
        url, "image", storage_options=storage_options, follow_symlinks=cfg.follow_symlinks
    )

    decoded: list[Image.Image] = []
    kept: list[int] = []
    skipped: list[str] = []
    policy = CONVERT.sized(cfg.image_size)
    for index, (path, blob) in enumerate(read_all(fs, paths)):
        if isinstance(blob, BaseException):
            skipped.append(path)
            continue
        try:
            decoded.append(open_image(blob, policy, where=path))
        except ImageReadError:
            skipped.append(path)
            continue
        kept.append(index)
    report_skips(url, skipped)
    if not decoded:
        raise DatasetError(
            f"{url}: no readable images (extensions {sorted(IMAGE_EXTENSIONS)}; "
            f"{len(skipped)} unreadable file(s) skipped)"
        )

    channels = cfg.channels or (1 if all(im.mode == "L" for im in decoded) else 3)
    table = _read_captions(fs, root, url, cfg.follow_symlinks)
    relpaths = [posixpath.relpath(paths[i], root) for i in kept]
    listed = [posixpath.relpath(path, root) for path in paths]
    unmatched = [] if table is None else unmatched_captions(table, listed)
    report_skips(url, unmatched, "captions row(s) naming no image of the folder")
    return ImageDataset(
        images=torch.stack([image_tensor(im, channels) for im in decoded]),
        labels=torch.tensor([labels[i] for i in kept], dtype=torch.long) if class_names else None,
        class_names=class_names,
        captions=None if table is None else _match_captions(table, relpaths, url),
        source=url,
        skipped=len(skipped) + len(unmatched),
    )


# ----------------------------------------------------------------------------- torchvision


def _local_root(cfg: DataConfig) -> str:
    protocol, path = fsspec.core.split_protocol(str(cfg.root))
    if protocol not in (None, "file", "local"):
        raise DatasetError(
            f"{cfg.root}: data.kind={cfg.kind!r} reads a local folder; "
            f"copy the files to local disk or use data.kind='folder' for image folders"
        )
    return os.path.expanduser(path)


def _load_torchvision(cfg: DataConfig, *, factory: Callable[..., Any]) -> ImageDataset:
    """A torchvision training split read from ``cfg.root``, resized to image_size."""
    root = _local_root(cfg)
    try:
        dataset = factory(root=root, train=True, download=cfg.download)
    except (RuntimeError, OSError) as exc:
        if cfg.download:
            raise DatasetError(f"{root}: could not download data.kind={cfg.kind!r}: {exc}") from exc
        raise DatasetError(
            f"{root}: data.kind={cfg.kind!r} files not found or corrupted; place them there "
            f"or set `data.download: true` to fetch them ({exc})"
        ) from exc
    data = torch.as_tensor(np.asarray(dataset.data, dtype=np.uint8))
    if data.ndim == 3:  # (N, H, W) greyscale
        data = data.unsqueeze(1)
    elif data.ndim == 4 and data.shape[-1] in (1, 3):  # (N, H, W, C)
        data = data.permute(0, 3, 1, 2)
    else:
        raise DatasetError(f"{root}: unexpected image array shape {tuple(data.shape)}")
    images = resize_uint8(data, cfg.image_size)
    return ImageDataset(
        images=match_channels(images, cfg.channels),
        labels=torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long),
        class_names=[str(name) for name in dataset.classes],
        source=f"torchvision {type(dataset).__name__} (train) at {root}",
    )


def load_mnist(cfg: DataConfig) -> ImageDataset:
    from torchvision.datasets import MNIST

    return _load_torchvision(cfg, factory=MNIST)


def load_fashion_mnist(cfg: DataConfig) -> ImageDataset:
    from torchvision.datasets import FashionMNIST

    return _load_torchvision(cfg, factory=FashionMNIST)


def load_cifar10(cfg: DataConfig) -> ImageDataset:
    from torchvision.datasets import CIFAR10

    return _load_torchvision(cfg, factory=CIFAR10)
