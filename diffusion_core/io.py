"""Files in and out, written once for the whole package.

- hashes: :func:`sha256_bytes`, :func:`sha256_file`;
- atomic writes: :func:`atomic_path` (one file), :func:`atomic_dir` (a folder), both staged beside
  their target and renamed into place, so a reader sees the old version or the whole new one;
- weights from configured places: :func:`fetch_weights` (a path or any fsspec URL, copied once into
  a cache, identified and checked by sha256);
- images under one reading policy (:class:`ImagePolicy`): :func:`open_image`, :func:`read_image`,
  :func:`read_mask`; uint8 tensors out as PNG (:func:`to_pil`, :func:`save_grid`,
  :func:`write_pngs`);
- :func:`psnr`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

_CHUNK = 8 * 2**20

# ----------------------------------------------------------------------------- hashes


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- atomic writes


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so a rename in it is durable (best effort: not every system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_MKSTEMP_TRIES = 20


def _mkstemp(path: Path, staging: Path) -> str:
    """A new empty file in ``staging`` for ``path``; retried when another writer removed the
    (then empty) staging folder while we were creating it or our file in it (``mkdir`` raises
    FileExistsError when the folder it found is gone by the time it checks)."""
    for attempt in range(_MKSTEMP_TRIES):
        try:
            staging.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=staging)
        except (FileNotFoundError, FileExistsError):
            if attempt == _MKSTEMP_TRIES - 1:
                raise
            continue
        os.close(fd)
        return tmp
    raise AssertionError("unreachable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, staging: Path | None = None) -> Iterator[Path]:
    """A temporary file that is fsync-ed and renamed to ``path`` when the block exits without
    error and removed when it fails: readers see the old file or the new, whole.

    The temporary lives beside ``path`` (a hidden name with the same suffix), or in the folder
    ``staging`` (on the same file system; removed again when empty), e.g. one that listings skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkstemp(path, staging or path.parent)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)
        if staging is not None:
            with contextlib.suppress(OSError):
                staging.rmdir()  # only succeeds when no other write is in flight


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


STAGING_PREFIX = ".tmp-"  # staging folders of atomic_dir start with this; safe to remove when stale


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A staging folder beside ``path`` whose files are fsync-ed and which replaces ``path``
    (a new one is renamed into place; an existing one is renamed aside, then removed) when the
    block exits without error; removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{path.name}-", dir=path.parent))
    try:
        yield staging
        for f in staging.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f"{STAGING_PREFIX}old-{path.name}-{os.getpid()}"
            os.replace(path, old)
        os.replace(staging, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- weights


class WeightsError(ValueError):
    """Weights that cannot be used: missing, unreadable or with another sha256 than expected."""


def fetch_weights(
    source: str, cache_dir: Path, *, expected_sha256: str | None = None, what: str = "weights"
) -> tuple[Path, str]:
    """A local copy of the weights at ``source`` and its sha256.

    ``source`` is a local path (used in place) or any fsspec URL (``file://``, ``s3://``, an
    artefact-store object), copied once into ``cache_dir`` under a name derived from the URL,
    through a temporary file that is renamed into place only when complete (a failed copy leaves
    nothing behind). The sha256 is computed on every call, so a record names the bytes actually
    used, and checked against ``expected_sha256`` when given. ``what`` names the setting in errors.
    """
    if "://" not in source or source.startswith("file://"):
        local = Path(source.removeprefix("file://")).expanduser()
        if not local.is_file():
            raise WeightsError(f"{what}: no such file {source}")
    else:
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        local = cache_dir / key / (Path(source.rstrip("/")).name or "weights")
        if not local.is_file():
            try:
                with (
                    fsspec.open(source, "rb") as src,
                    atomic_path(local) as tmp,
                    open(tmp, "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst, _CHUNK)
            except FileNotFoundError:
                raise WeightsError(f"{what}: {source} not found") from None
            except (OSError, ValueError) as exc:
                raise WeightsError(f"{what}: cannot fetch {source} ({exc})") from exc
    sha = sha256_file(local)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise WeightsError(f"{what}: {source} has sha256 {sha}, expected {expected_sha256}")
    return local, sha


# ----------------------------------------------------------------------------- images in

_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "P;L", *_WIDE_MODES})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# What decoding untrusted bytes may raise besides OSError (PIL.UnidentifiedImageError, truncated).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,  # some PIL plugins on malformed headers
    EOFError,
    Image.DecompressionBombError,
)


class ImageReadError(ValueError):
    """An image file that cannot be read under the policy; the message names the file."""


@dataclass(frozen=True)
class ImagePolicy:
    """How an image file becomes pixels.

    ``size``: the side of the square result, or None to keep the image's own size.
    ``exact``: nothing lossy is done; an image of another size, with transparent pixels, with
    more than 8 bits, or in colour for a one-channel ``channels`` is refused (inpainting, where
    the known region must come back bit for bit). Otherwise images are centre-cropped to a square
    and resized (LANCZOS), transparency is composited onto black and 16-bit or float images are
    rescaled to 8 bits.
    ``channels``: 1 or 3, or None for the image's own (1 for greyscale, else 3).
    ``jpeg_luma``: a colour JPEG is read as its own Y plane (one channel), the luma its decoder
    reads before the colour conversion clips it; ``drop_alpha``: the colour stored under
    transparency is kept as it is (the watermark reader reads pixels as they were stored).
    """

    size: int | None = None
    exact: bool = False
    channels: int | None = None
    jpeg_luma: bool = False
    drop_alpha: bool = False

    def sized(self, size: int | None, channels: int | None = None) -> ImagePolicy:
        return replace(self, size=size, channels=channels if channels else self.channels)


CONVERT = ImagePolicy()  # training data, calibration folders, figures
EXACT = ImagePolicy(exact=True)  # inpainting inputs
AS_STORED = ImagePolicy(jpeg_luma=True, drop_alpha=True)  # watermark verification


def _to_8bit(image: Image.Image, policy: ImagePolicy, where: str) -> Image.Image:
    """A decoded image as "L" (greyscale sources) or "RGB" under ``policy``."""
    if image.mode in _WIDE_MODES:
        if policy.exact:
            raise ImageReadError(f"{where}: {image.mode} images are not 8-bit; save it as 8-bit")
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0.0) > 255.0 else 255.0
        return Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8))
    grey = image.mode in _GREY_MODES
    transparent = "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)
    if transparent and not policy.drop_alpha:
        rgba = image.convert("RGBA")
        if policy.exact and not bool((np.asarray(rgba)[..., 3] == 255).all()):
            raise ImageReadError(f"{where}: image has transparent pixels; give an opaque image")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        flat.alpha_composite(rgba)
        image = flat
    return image.convert("L" if grey else "RGB")


def _fit(image: Image.Image, policy: ImagePolicy, where: str) -> Image.Image:
    size = policy.size
    if size is None or image.size == (size, size):
        return image
    if policy.exact:
        raise ImageReadError(
            f"{where}: image is {image.size[0]}x{image.size[1]}, the model takes {size}x{size}"
        )
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def open_image(
    source: bytes | str | os.PathLike[str], policy: ImagePolicy = CONVERT, *, where: str = ""
) -> Image.Image:
    """Decode ``source`` (bytes or a path) under ``policy`` as an "L" or "RGB" image of the
    policy's size; ImageReadError naming ``where`` (default: the path) when it cannot."""
    where = where or (str(source) if not isinstance(source, bytes) else "<image>")
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with opened:
            if policy.jpeg_luma and opened.format == "JPEG" and opened.mode in ("RGB", "YCbCr"):
                opened.draft("YCbCr", opened.size)  # decode without the colour conversion
                opened.load()
                ycbcr = opened.mode == "YCbCr"
                image = (
                    Image.fromarray(np.asarray(opened)[..., 0]) if ycbcr else opened.convert("L")
                )
            else:
                opened.load()
                image = _to_8bit(opened, policy, where)
    except ImageReadError:
        raise
    except DECODE_ERRORS as exc:
        raise ImageReadError(f"{where}: cannot read image ({exc})") from None
    return _fit(image, policy, where)


def image_tensor(image: Image.Image, channels: int | None = None, *, where: str = "") -> Tensor:
    """An "L" or "RGB" image as uint8 (C, H, W) with ``channels`` (None: its own)."""
    arr = np.array(image)  # a writable copy
    arr = arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)
    if channels == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif channels == 1 and arr.shape[-1] == 3:
        arr = to_grey(arr, where=where, exact=False)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (C, H, W)


def to_grey(rgb: np.ndarray, *, where: str, exact: bool) -> np.ndarray:
    """(..., 3) uint8 to (..., 1): ITU-R 601-2 luma, or, when ``exact``, only an image whose three
    channels are equal (nothing is lost), else ImageReadError naming ``where``."""
    if exact:
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise ImageReadError(f"{where}: a colour image, but the model takes one channel")
        return rgb[..., :1]
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(luma.round(), 0, 255).astype(np.uint8)[..., None]


def read_image(path: str | os.PathLike[str], policy: ImagePolicy = CONVERT) -> Tensor:
    """One image file as uint8 (C, H, W) under ``policy``; ImageReadError naming the file."""
    image = open_image(path, policy)
    if policy.exact and policy.channels == 1 and image.mode == "RGB":
        arr = to_grey(np.array(image), where=str(path), exact=True)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return image_tensor(image, policy.channels, where=str(path))


def read_mask(source: str | os.PathLike[str] | np.ndarray, size: int | None = None) -> Tensor:
    """An inpainting mask as (1, 1, H, W) float of {0, 1}, 1 = KNOWN.

    A file (any format PIL reads, in greyscale) counts a pixel as known where it is white
    (>= 128) and must be ``size`` x ``size`` when ``size`` is given. An array (H, W) or (H, W, C)
    (channels averaged) counts as known where >= 128 for integers and >= 0.5 for floats and
    booleans.
    """
    if isinstance(source, np.ndarray):
        array = source.astype(np.float64).mean(axis=-1) if source.ndim == 3 else source
        if array.ndim != 2:
            raise ImageReadError(f"a mask array must be (H, W) or (H, W, C), got {source.shape}")
        threshold = 128 if np.issubdtype(source.dtype, np.integer) else 0.5
        known = np.asarray(array) >= threshold
        where = "mask array"
    else:
        where = str(source)
        try:
            with Image.open(source) as opened:
                known = np.asarray(opened.convert("L")) >= 128
        except DECODE_ERRORS as exc:
            raise ImageReadError(f"{where}: cannot read mask ({exc})") from None
    if size is not None and known.shape != (size, size):
        height, width = known.shape
        raise ImageReadError(f"{where}: mask is {width}x{height}, the image is {size}x{size}")
    return torch.from_numpy(known.astype(np.float32))[None, None]  # (1, 1, H, W)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden files skipped), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


# ----------------------------------------------------------------------------- images out


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) uint8 to a PIL image (L for one channel, RGB for three)."""
    arr = image.permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def make_grid(images: Tensor, *, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Tensor:
    """Tile (N, C, H, W) uint8 images into one (C, H', W') image, ``nrow`` per row (default: a
    square), with ``pad`` black pixels around every tile, then magnify ``scale`` times.

    ``torchvision.utils.make_grid`` does the tiling. It narrows a row with fewer than ``nrow``
    images, returns a lone image without its border and repeats one channel to three, so a short
    row is filled with black tiles, a lone image gets its border and one channel stays one.
    """
    from torchvision.utils import make_grid as make_image_grid  # slow to import: only when needed

    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    tiles = torch.cat([images, images.new_zeros((max(0, nrow - n), c, h, w))])
    if len(tiles) == 1:
        grid = F.pad(tiles[0], (pad, pad, pad, pad))
    else:
        grid = make_image_grid(tiles, nrow=nrow, padding=pad)[:c]  # (C, H', W')
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid


def save_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 1) -> Path:
    """A grid of uint8 (N, C, H, W) images as one PNG, written atomically (grey stays one
    channel; torchvision's ``save_image`` takes floats in [0, 1] and writes RGB)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        to_pil(make_grid(images, nrow=nrow, scale=scale)).save(tmp, format="PNG")
    return path


def write_pngs(images: Sequence[Tensor], names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Write uint8 (C, H, W) images as ``out_dir/<name>``, all or nothing.

    The files are written into a staging folder beside ``out_dir`` first; a new ``out_dir`` is
    renamed into place in one step, into an existing one each file is renamed over (so a reader
    never sees a partial file, and a failure before the renames leaves nothing behind).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{STAGING_PREFIX}", dir=out_dir.parent))
    try:
        for image, name in zip(images, names, strict=True):
            to_pil(image).save(staging / name, format="PNG")
        if not out_dir.exists():
            os.replace(staging, out_dir)
        else:
            for name in names:
                os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in names]


# ----------------------------------------------------------------------------- measures


def psnr_from_mse(mse: float, *, peak: float) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(peak^2 / mse)``; infinite when exact."""
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def psnr(reference: Tensor, other: Tensor) -> float:
    """PSNR in dB of two uint8 images (or batches) on the 0..255 scale."""
    mse = float(((reference.double() - other.double()) ** 2).mean())
    return psnr_from_mse(mse, peak=255.0)
