"""Image datasets: loaders for each ``DataConfig.kind``, a content hash and a seeded split.

Every loader returns an :class:`ImageDataset` holding uint8 images shaped (N, C, H, W), or for
the volume kinds (see :mod:`diffusion_core.volumes`) uint8 volumes shaped (N, C, D, H, W).
Loaders are looked up in :data:`DATASETS` by ``DataConfig.kind``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from diffusion_core.config import DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
CAPTION_FILES = ("captions.csv", "captions.jsonl")
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and truncated files
    ValueError,
    SyntaxError,  # raised by some PIL plugins on malformed headers
    EOFError,
    Image.DecompressionBombError,
)
_READ_BATCH = 256  # files fetched per fsspec ``cat_ranges`` call
_NAMED_SKIPS = 5  # how many skipped files a warning names


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the file, URL or key at fault."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images (or volumes) in memory with optional labels and captions.

    ``images`` is uint8 (N, C, H, W), or (N, C, D, H, W) for volumes; ``labels`` is int64 (N,)
    or None; ``captions`` has one string per image or is None; ``skipped`` counts unreadable
    source files left out.
    """

    images: Tensor
    labels: Tensor | None
    class_names: list[str]
    captions: list[str] | None = None
    source: str = ""
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim not in (4, 5):
            raise DatasetError(
                f"{self.source}: images must be uint8 (N, C, H, W) or volumes (N, C, D, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n = self.images.shape[0]
        if self.labels is not None:
            if self.labels.dtype != torch.long or self.labels.shape != (n,):
                raise DatasetError(
                    f"{self.source}: labels must be int64 ({n},), "
                    f"got {self.labels.dtype} {tuple(self.labels.shape)}"
                )
            if n and (
                int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)
            ):
                raise DatasetError(
                    f"{self.source}: labels must lie in [0, {len(self.class_names)}) "
                    f"(one per class name)"
                )
        if self.captions is not None and len(self.captions) != n:
            raise DatasetError(f"{self.source}: {len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def dims(self) -> int:
        """2 for images, 3 for volumes."""
        return int(self.images.ndim - 2)

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> ImageDataset:
        """The images at ``indices`` (in that order), with their labels and captions."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageDataset(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=list(self.class_names),
            captions=None if self.captions is None else [self.captions[i] for i in idx.tolist()],
            source=self.source,
            skipped=self.skipped,
        )

    def to_float(self) -> Tensor:
        """Images as float32 in [-1, 1]."""
        return self.images.to(torch.float32) / 127.5 - 1.0

    def sha256(self) -> str:
        """Content hash over images, labels and class names; the dataset's identity."""
        digest = hashlib.sha256()
        header = {
            "shape": list(self.images.shape),
            "labels": self.labels is not None,
            "class_names": list(self.class_names),
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(self.images.detach().cpu().contiguous().numpy().tobytes())
        if self.labels is not None:
            digest.update(self.labels.detach().cpu().numpy().astype("<i8").tobytes())
        return digest.hexdigest()


# ----------------------------------------------------------------------------- tensor helpers


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of (N, C, H, W) to (N, C, size, size), rounded to uint8."""
    x = images.to(torch.float32)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return x.round().clamp_(0, 255).to(torch.uint8)


def _match_channels(images: Tensor, channels: int | None) -> Tensor:
    """Grey <-> RGB conversion of uint8 (N, C, H, W); ``None`` keeps the source's channels."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = (images.to(torch.float32) * weights).sum(dim=1, keepdim=True)
        return grey.round().clamp_(0, 255).to(torch.uint8)
    raise DatasetError(f"cannot convert {have}-channel images to {channels} channels")


# ----------------------------------------------------------------------------- digits


def load_digits(cfg: DataConfig) -> ImageDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, offline), resized to image_size."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    grey = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0))
    images = _resize_uint8(grey.unsqueeze(1), cfg.image_size)
    return ImageDataset(
        images=_match_channels(images, cfg.channels),
        labels=torch.as_tensor(np.asarray(bunch.target), dtype=torch.long),
        class_names=[str(d) for d in range(10)],
        source="sklearn.datasets.load_digits",
    )


# ----------------------------------------------------------------------------- image folder


def _storage_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Copy of ``storage_options``; for s3 URLs, ``AWS_ENDPOINT_URL`` fills in the endpoint."""
    options = dict(storage_options or {})
    protocol, _ = fsspec.core.split_protocol(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = options.get("client_kwargs") or {}
    if (
        protocol in ("s3", "s3a")
        and endpoint
        and "endpoint_url" not in options
        and "endpoint_url" not in client_kwargs
    ):
        options["endpoint_url"] = endpoint
    return options


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(path: str) -> bool:
    return posixpath.basename(path.rstrip("/")).startswith(".")


def _list_images(
    fs: fsspec.AbstractFileSystem, root: str, *, accept: Callable[[str], bool] = _is_image
) -> tuple[list[str], list[int], list[str]]:
    """Image paths (or other files that ``accept`` takes) under ``root`` with labels and class
    names.

    Sub-folders holding images are classes (labels follow sorted folder names); without any,
    images directly in ``root`` form an unlabelled set and the class list is empty.
    """
    entries = [e for e in fs.ls(root, detail=True) if not _is_hidden(e["name"])]
    classes: dict[str, list[str]] = {}
    for entry in entries:
        if entry["type"] != "directory":
            continue
        found = sorted(p for p in fs.find(entry["name"]) if accept(p) and not _is_hidden(p))
        if found:
            classes[posixpath.basename(entry["name"].rstrip("/"))] = found
    loose = sorted(e["name"] for e in entries if e["type"] != "directory" and accept(e["name"]))
    if not classes:
        return loose, [], []
    if loose:
        logger.warning("%s: ignoring %d image(s) outside the class sub-folders", root, len(loose))
    names = sorted(classes)
    paths = [p for name in names for p in classes[name]]
    labels = [label for label, name in enumerate(names) for _ in classes[name]]
    return paths, labels, names


def _read_all(fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> Iterable[tuple[str, Any]]:
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


def _to_8bit(image: Image.Image) -> Image.Image:
    """Decoded image as "L" (greyscale sources) or "RGB"; alpha is composited onto black."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0.0) > 255.0 else 255.0
        return Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8))
    grey = image.mode in _GREY_MODES
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        flat.alpha_composite(rgba)
        image = flat
    return image.convert("L" if grey else "RGB")


def _decode(blob: bytes, size: int) -> Image.Image:
    """Decode, center-crop to a square and resize with LANCZOS; raises on unreadable data."""
    with Image.open(io.BytesIO(blob)) as opened:
        opened.load()
        image = _to_8bit(opened)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _stack(images: Sequence[Image.Image], channels: int) -> Tensor:
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(im.convert(mode), dtype=np.uint8) for im in images]
    batch = np.stack(arrays)
    batch = batch[:, None] if channels == 1 else batch.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(batch))


def _parse_captions_csv(text: str, where: str) -> dict[str, str]:
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if "file" not in fields or "caption" not in fields:
        raise DatasetError(f"{where}: needs columns 'file' and 'caption', found {fields}")
    return {row["file"]: row["caption"] or "" for row in reader if row.get("file")}


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


def _read_captions(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, str] | None:
    """The root's captions file as {file: caption}, or None when there is none."""
    present = [name for name in CAPTION_FILES if fs.isfile(posixpath.join(root, name))]
    if not present:
        return None
    if len(present) > 1:
        raise DatasetError(f"{url}: found both {' and '.join(present)}; keep one")
    name = present[0]
    where = posixpath.join(url.rstrip("/"), name)
    try:
        text = fs.cat_file(posixpath.join(root, name)).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{where}: not UTF-8 text") from None
    if name.endswith(".csv"):
        return _parse_captions_csv(text, where)
    return _parse_captions_jsonl(text, where)


def _match_captions(table: dict[str, str], relpaths: Sequence[str], url: str) -> list[str]:
    """One caption per image: keyed by path relative to the root, else by file name."""
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


def _report_skips(url: str, skipped: list[str]) -> None:
    if not skipped:
        return
    named = ", ".join(skipped[:_NAMED_SKIPS]) + (", ..." if len(skipped) > _NAMED_SKIPS else "")
    logger.warning("%s: skipped %d unreadable image file(s): %s", url, len(skipped), named)


def list_folder(
    url: str,
    what: str,
    *,
    accept: Callable[[str], bool] = _is_image,
    storage_options: dict[str, Any] | None = None,
) -> tuple[fsspec.AbstractFileSystem, str, list[str], list[int], list[str]]:
    """The filesystem and root of the ``what`` folder at ``url``, and its files that ``accept``
    takes, with labels and class names (see ``_list_images``); a missing or unlistable folder is
    a DatasetError naming the URL."""
    fs, root = fsspec.core.url_to_fs(url, **_storage_options(url, storage_options))
    root = root.rstrip("/") or root
    if not fs.isdir(root):
        kind = "not a folder" if fs.exists(root) else "not found"
        raise DatasetError(f"{url}: {what} folder {kind}")
    try:
        paths, labels, class_names = _list_images(fs, root, accept=accept)
    except OSError as exc:
        raise DatasetError(f"{url}: cannot list the {what} folder: {exc}") from exc
    return fs, root, paths, labels, class_names


def load_folder(cfg: DataConfig, *, storage_options: dict[str, Any] | None = None) -> ImageDataset:
    """Images under ``cfg.root`` (any fsspec URL), one class per sub-folder or a flat folder.

    Unreadable files are skipped and counted. ``storage_options`` go to the filesystem; for
    s3 URLs the ``AWS_ENDPOINT_URL`` environment variable sets the endpoint when given.
    """
    url = str(cfg.root)
    fs, root, paths, labels, class_names = list_folder(
        url, "image", storage_options=storage_options
    )

    decoded: list[Image.Image] = []
    kept: list[int] = []
    skipped: list[str] = []
    for index, (path, blob) in enumerate(_read_all(fs, paths)):
        if isinstance(blob, BaseException):
            skipped.append(path)
            continue
        try:
            decoded.append(_decode(blob, cfg.image_size))
        except _DECODE_ERRORS:
            skipped.append(path)
            continue
        kept.append(index)
    _report_skips(url, skipped)
    if not decoded:
        raise DatasetError(
            f"{url}: no readable images (extensions {sorted(IMAGE_EXTENSIONS)}; "
            f"{len(skipped)} unreadable file(s) skipped)"
        )

    channels = cfg.channels or (1 if all(im.mode == "L" for im in decoded) else 3)
    table = _read_captions(fs, root, url)
    relpaths = [posixpath.relpath(paths[i], root) for i in kept]
    return ImageDataset(
        images=_stack(decoded, channels),
        labels=torch.tensor([labels[i] for i in kept], dtype=torch.long) if class_names else None,
        class_names=class_names,
        captions=None if table is None else _match_captions(table, relpaths, url),
        source=url,
        skipped=len(skipped),
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
    images = _resize_uint8(data, cfg.image_size)
    return ImageDataset(
        images=_match_channels(images, cfg.channels),
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


# ----------------------------------------------------------------------------- shapes

SHAPE_NAMES = ("square", "circle", "triangle")
# A 3 x 3 grid of cell centres, (x, y) as fractions of the side, in reading order.
SHAPE_POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 6, 1 / 6),
    "top": (1 / 2, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 1 / 2),
    "center": (1 / 2, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom": (1 / 2, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {  # far apart in RGB, all far from the background
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
}
SHAPE_RADIUS = 0.16  # half the extent of a shape, as a fraction of the side (cells are 1/3)
SHAPE_BACKGROUND = (16, 16, 24)


def shape_mask(shape: str, centre: tuple[float, float], size: int) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` centred at ``centre`` (fractions of the side)."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = centre[0] * size, centre[1] * size
    r = max(SHAPE_RADIUS * size, 0.75)
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    # upward triangle: apex at (cx, cy - r), base along y = cy + r from cx - r to cx + r
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def shape_caption(shape: str, position: str, colour: str | None) -> str:
    """E.g. "a red square at the top left", "a blue circle on the right", "a green triangle in
    the center"; greyscale sets leave the colour out."""
    noun = shape if colour is None else f"{colour} {shape}"
    article = "an" if noun[0] in "aeiou" else "a"
    if position == "center":
        where = "in the center"
    elif position in ("left", "right"):
        where = f"on the {position}"
    else:
        where = f"at the {position}"
    return f"{article} {noun} {where}"


def load_shapes(cfg: DataConfig) -> ImageDataset:
    """Synthetic, offline: one coloured shape on a dark background per image, seeded.

    3 shapes x 5 colours x 9 cells of a 3 x 3 grid, drawn uniformly; the caption names all three
    ("a red square at the top left"), and ``diffusion_core.shapes_eval`` reads them back.
    """
    rng = np.random.RandomState(cfg.split_seed)
    n, size = cfg.num_samples, cfg.image_size
    positions, colours = list(SHAPE_POSITIONS), list(SHAPE_COLOURS)
    shape_idx = rng.randint(len(SHAPE_NAMES), size=n)
    position_idx = rng.randint(len(positions), size=n)
    colour_idx = rng.randint(len(colours), size=n)

    masks = {
        (s, p): shape_mask(SHAPE_NAMES[s], SHAPE_POSITIONS[positions[p]], size)
        for s in range(len(SHAPE_NAMES))
        for p in range(len(positions))
    }
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    images[:] = SHAPE_BACKGROUND
    for i in range(n):
        images[i][masks[shape_idx[i], position_idx[i]]] = SHAPE_COLOURS[colours[colour_idx[i]]]
    grey = cfg.channels == 1
    captions = [
        shape_caption(SHAPE_NAMES[s], positions[p], None if grey else colours[c])
        for s, p, c in zip(shape_idx, position_idx, colour_idx, strict=True)
    ]
    rgb = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(
        images=_match_channels(rgb, 1 if grey else 3),
        labels=torch.as_tensor(shape_idx, dtype=torch.long),
        class_names=list(SHAPE_NAMES),
        captions=captions,
        source=f"synthetic shapes (n={n}, seed={cfg.split_seed})",
    )


# ----------------------------------------------------------------------------- volumes


def load_volumes(cfg: DataConfig) -> ImageDataset:
    """Synthetic spheres, boxes and tori (see :func:`diffusion_core.volumes.synthetic_volumes`)."""
    from diffusion_core.volumes import synthetic_volumes

    return synthetic_volumes(cfg)


def load_volume_folder(cfg: DataConfig) -> ImageDataset:
    """``.npy`` volumes under ``cfg.root`` (see :func:`diffusion_core.volumes.volume_folder`)."""
    from diffusion_core.volumes import volume_folder

    return volume_folder(cfg)


# ----------------------------------------------------------------------------- entry points

DATASETS: dict[str, Callable[[DataConfig], ImageDataset]] = {
    "digits": load_digits,
    "folder": load_folder,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "shapes": load_shapes,
    "volumes": load_volumes,
    "volume_folder": load_volume_folder,
}


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the dataset that ``cfg.kind`` names."""
    loader = DATASETS.get(cfg.kind)
    if loader is None:
        raise DatasetError(f"data.kind={cfg.kind!r}: unknown (allowed: {', '.join(DATASETS)})")
    dataset = loader(cfg)
    logger.info(
        "loaded %d images %s from %s (skipped %d)",
        len(dataset),
        tuple(dataset.images.shape[1:]),
        dataset.source,
        dataset.skipped,
    )
    return dataset


def split_dataset(
    ds: ImageDataset, *, holdout_fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """(train, holdout): the holdout is the first round(fraction * N) of a seeded permutation."""
    if not 0.0 < holdout_fraction < 1.0:
        raise DatasetError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    n = len(ds)
    n_holdout = round(holdout_fraction * n)
    if n_holdout == 0 or n_holdout == n:
        raise DatasetError(
            f"{ds.source}: {n} images with holdout_fraction={holdout_fraction} leave an empty "
            f"{'holdout' if n_holdout == 0 else 'training'} split"
        )
    order = np.random.RandomState(seed).permutation(n)
    return ds.subset(order[n_holdout:]), ds.subset(order[:n_holdout])
