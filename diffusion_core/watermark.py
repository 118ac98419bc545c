"""Invisible watermarks for small images (16x16 and up), keyed, with an error-detecting payload.

Why not invisible-watermark (``imwatermark``): it refuses images under 256x256, and the samples
here are 16x16 digits and 32x32 colour images. At that size additive spread spectrum drowns in
the image itself: the digits' correlations with a unit-norm carrier pattern spread over 167 grey
levels (standard deviation), while a 48-bit mark at 38 dB PSNR on 256 pixels has 7.4 per bit.
So this module uses *spread-transform dither modulation* (STDM; Chen & Wornell 2001,
"Quantization index modulation", sec. V-B), which cancels the host's interference:

- Carrier: the luma (the grey channel, or JFIF Y = 0.299 R + 0.587 G + 0.114 B) is cut into 8x8
  blocks aligned with JPEG's; in each block the orthonormal DCT-II coefficients at zigzag
  positions 1..14 (the lowest AC frequencies, where JPEG quantises least) form the carrier
  space of D = 14 * blocks dimensions. A key-derived random orthonormal matrix gives one spreading
  pattern per payload bit (D >= 48, so 16x16, with D = 56, is the smallest square image).
- Embedding: bit i's correlation ``s_i = <luma, pattern_i>`` is moved to the nearest point of
  the lattice ``d_i + bit * step / 2 + step * Z`` (``d_i`` a key-derived dither). The same
  luma change is added to every channel (which leaves JPEG's chroma untouched), pixels are
  clipped to [0, 255], and the two steps alternate (projections onto convex sets) for a fixed
  number of rounds before rounding to uint8.
- Decoding: correlate with the same patterns, read each bit from the nearer sub-lattice, and
  accept the payload only when its CRC-16 matches: a random or unmarked image, or a marked one
  read with another key, passes with probability 2^-16.

The lattice step is ``strength * sqrt(H * W / 256)`` (``strength`` 18 by default; H and W
rounded down to whole 8x8 blocks, which is the part of the image that carries the mark), so the
expected distortion, ``bits * step**2 / 12`` over the image, is ``strength**2 / 64`` per pixel at
every size: 41.1 dB PSNR at the default, less where clipping at 0 or 255 pushes the change onto
fewer pixels (39.1 dB on average over the digits). A bit survives any change of its correlation
smaller than ``step / 4`` (4.5 grey levels at 16x16, 9 at 32x32); JPEG at quality 90 moves it by
about 1 RMS and at quality 75 by about 2.5, at 16x16 and 32x32 alike (see bench/README.md).

Payload (48 bits): a 16-bit tag of the model name (the first two bytes of its sha256), the
16-bit model version, and CRC-16/CCITT-FALSE over those four bytes.

Provenance in PNG files: :func:`save_png` writes tEXt chunks (model name, version, run id, key
id, scheme) and :func:`read_png_provenance` reads them. The key itself is never written or
logged; its id is a one-way fingerprint that tells which key marked an image.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import io
import logging
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from diffusion_core.config import diffpipe_home
from diffusion_core.io import AS_STORED, ImageReadError, image_tensor, open_image, read_image
from diffusion_core.settings import WATERMARK_KEY_VARIABLE, settings

logger = logging.getLogger(__name__)

SCHEME = "diffpipe-stdm-dct8-v1"
BLOCK = 8
BAND = range(1, 15)  # zigzag positions of the carrier coefficients in each 8x8 block
PAYLOAD_BITS = 48
DEFAULT_STRENGTH = 18.0  # the lattice step at 16x16, in grey levels
DEFAULT_ITERATIONS = 30
MIN_KEY_BYTES = 16
KEY_ENV = WATERMARK_KEY_VARIABLE
LUMA = np.array([0.299, 0.587, 0.114])  # JFIF / ITU-R BT.601, as JPEG encoders use
PNG_KEYS = ("model", "version", "run_id", "key_id", "scheme")  # tEXt keys, "diffpipe:" prefix


class WatermarkError(ValueError):
    """An image, key or payload the watermark cannot work with; the message names it."""


# ----------------------------------------------------------------------------- key


class WatermarkKey:
    """The secret that derives the patterns and dithers. Its repr and ``key_id`` never show it."""

    def __init__(self, secret: bytes, *, source: str = "<key>") -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise WatermarkError(
                f"{source}: a watermark key needs at least {MIN_KEY_BYTES} bytes, got {len(secret)}"
            )
        self._secret = bytes(secret)
        self.source = source

    @property
    def key_id(self) -> str:
        """16 hex digits of a one-way fingerprint: safe to log, print and store."""
        return hashlib.sha256(b"diffpipe-watermark-key-id\0" + self._secret).hexdigest()[:16]

    def derive(self, label: str) -> bytes:
        """HMAC-SHA256 of ``label`` under the key (32 bytes)."""
        return hmac.new(self._secret, label.encode(), hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"WatermarkKey(id={self.key_id}, source={self.source!r})"


def default_key_file() -> Path:
    """``$DIFFPIPE_HOME/watermark.key``: the key used when neither a file nor the variable is
    set (created on first use, mode 0600)."""
    return diffpipe_home() / "watermark.key"


def load_key(
    *, key_file: str | os.PathLike[str] | None = None, key_env: str = KEY_ENV, create: bool = False
) -> WatermarkKey:
    """The watermark key: from ``key_file`` when given, else the environment variable
    ``key_env`` when set, else :func:`default_key_file` (generated when ``create`` is true).

    Raises WatermarkError naming the file or variable (never the key) when it cannot be used.
    """
    if key_file is not None:
        return _read_key_file(Path(key_file))
    value = settings().secret(key_env)
    if value is not None:
        return WatermarkKey(value.get_secret_value().encode(), source=f"${key_env}")
    path = default_key_file()
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        key = _read_key_file(path)
        logger.info("created watermark key %s (key id %s)", path, key.key_id)
        return key
    if not path.exists():
        raise WatermarkError(
            f"no watermark key: ${key_env} is not set and {path} does not exist "
            f"(pass a key file, or set ${key_env})"
        )
    return _read_key_file(path)


def _read_key_file(path: Path) -> WatermarkKey:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise WatermarkError(
            f"{path}: cannot read the watermark key file ({exc.strerror})"
        ) from None
    return WatermarkKey(secret, source=str(path))


# ----------------------------------------------------------------------------- payload


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection (the standard
    library's ``binascii.crc_hqx`` started at 0xFFFF)."""
    return binascii.crc_hqx(data, 0xFFFF)


def model_tag(name: str) -> int:
    """The 16-bit tag of a model name carried in the mark: its sha256's first two bytes."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big")


@dataclass(frozen=True)
class Payload:
    """What a mark says: the model's name tag and version (each 16 bits)."""

    model_tag: int
    version: int

    def __post_init__(self) -> None:
        for name in ("model_tag", "version"):
            value = getattr(self, name)
            if not 0 <= value < 1 << 16:
                raise WatermarkError(f"payload {name} must be in 0..65535, got {value}")

    @classmethod
    def for_model(cls, name: str, version: int | str) -> Payload:
        try:
            number = int(version)
        except ValueError:
            raise WatermarkError(f"model version must be an integer, got {version!r}") from None
        return cls(model_tag(name), number)

    def matches_model(self, name: str) -> bool:
        return self.model_tag == model_tag(name)

    def to_bits(self) -> np.ndarray:
        """The 48 payload bits (uint8 0/1): tag, version, CRC-16 of both, most significant first."""
        data = self.model_tag.to_bytes(2, "big") + self.version.to_bytes(2, "big")
        frame = data + crc16(data).to_bytes(2, "big")
        return np.unpackbits(np.frombuffer(frame, dtype=np.uint8))

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> Payload | None:
        """The payload the bits carry, or None when the CRC does not match."""
        frame = np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()
        if len(frame) != PAYLOAD_BITS // 8 or crc16(frame[:4]) != int.from_bytes(frame[4:], "big"):
            return None
        return cls(int.from_bytes(frame[:2], "big"), int.from_bytes(frame[2:4], "big"))


# ----------------------------------------------------------------------------- carrier


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): row k is the k-th basis vector."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def _zigzag(n: int) -> list[tuple[int, int]]:
    """(row, col) of an n x n block in JPEG's zigzag order."""
    cells = [(r, c) for r in range(n) for c in range(n)]
    return sorted(cells, key=lambda rc: (rc[0] + rc[1], rc[0] if (rc[0] + rc[1]) % 2 else rc[1]))


def _spatial(coefficients: np.ndarray, height: int, width: int) -> np.ndarray:
    """(D, K) carrier coordinates -> (H*W, K) images: each column's coefficients are placed at
    the band's positions of every 8x8 block (blocks in row-major order) and inverse-DCT'd.
    Pixels past the last whole block stay 0."""
    k = coefficients.shape[1]
    hb, wb = height // BLOCK, width // BLOCK
    zigzag = _zigzag(BLOCK)
    rows, cols = zip(*(zigzag[z] for z in BAND), strict=True)
    coef = np.zeros((k, hb, wb, BLOCK, BLOCK))
    coef[:, :, :, list(rows), list(cols)] = coefficients.T.reshape(k, hb, wb, len(BAND))
    dct = _dct_matrix(BLOCK)
    blocks = (dct.T @ coef @ dct).transpose(0, 1, 3, 2, 4)  # C^T X C, (K, hb, 8, wb, 8)
    images = np.zeros((k, height, width))
    images[:, : hb * BLOCK, : wb * BLOCK] = blocks.reshape(k, hb * BLOCK, wb * BLOCK)
    return images.reshape(k, height * width).T


def capacity(height: int, width: int) -> int:
    """Carrier dimensions of an image of this size (the payload needs PAYLOAD_BITS)."""
    return (height // BLOCK) * (width // BLOCK) * len(BAND)


@dataclass(frozen=True, eq=False)
class Carrier:
    """The key's patterns for one image size: ``patterns`` (H*W, bits) with orthonormal
    columns, ``dither`` (bits,) in [0, step), and the lattice ``step`` in grey levels."""

    patterns: np.ndarray
    dither: np.ndarray
    step: float


def carrier(
    key: WatermarkKey, height: int, width: int, *, strength: float = DEFAULT_STRENGTH
) -> Carrier:
    """The patterns and dithers ``key`` derives for ``height`` x ``width`` images, with the
    lattice step ``strength * sqrt(H * W / 256)`` over the whole 8x8 blocks: the same distortion
    per pixel (PSNR) at every size. (A fixed step spread over a large image would be mostly
    undone by rounding to uint8.)
    """
    if not (np.isfinite(strength) and strength > 0):
        raise WatermarkError(f"watermark strength must be a finite number > 0, got {strength}")
    if capacity(height, width) < PAYLOAD_BITS:
        raise WatermarkError(
            f"a {height}x{width} image is too small for the {PAYLOAD_BITS}-bit watermark: it has "
            f"{capacity(height, width)} carrier coefficients, at least 16x16 pixels are needed"
        )
    step = float(strength) * np.sqrt((height // BLOCK) * (width // BLOCK) / 4.0)
    return _carrier(key.derive(f"{SCHEME}/{height}x{width}"), height, width, step)


@lru_cache(maxsize=16)
def _carrier(seed: bytes, height: int, width: int, step: float) -> Carrier:
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    q, r = np.linalg.qr(rng.standard_normal((capacity(height, width), PAYLOAD_BITS)))
    q = q * np.sign(np.diag(r))  # (D, bits), a uniformly random orthonormal frame
    return Carrier(_spatial(q, height, width), rng.uniform(0.0, step, PAYLOAD_BITS), step)


# ----------------------------------------------------------------------------- embed / decode


def _as_array(images: Tensor) -> np.ndarray:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != torch.uint8:
        raise WatermarkError(
            f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    return images.numpy().astype(np.float64)


def _luma(pixels: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float -> (N, H*W) luma."""
    n, channels, h, w = pixels.shape
    if channels == 1:
        return pixels[:, 0].reshape(n, h * w)
    return np.einsum("c,nchw->nhw", LUMA, pixels).reshape(n, h * w)


def _correlations(pixels: np.ndarray, c: Carrier) -> np.ndarray:
    return _luma(pixels) @ c.patterns  # (N, bits)


def embed(
    images: Tensor,
    payload: Payload,
    key: WatermarkKey,
    *,
    strength: float = DEFAULT_STRENGTH,
    iterations: int = DEFAULT_ITERATIONS,
) -> Tensor:
    """``images`` (uint8 (N, C, H, W), C = 1 or 3) carrying ``payload`` under ``key``.

    Every correlation goes to the nearest lattice point of its bit (STDM). The luma change is
    added to every channel (JPEG's chroma stays as it was) and the result clipped to [0, 255];
    clipping moves the correlations a little, so the two steps alternate ``iterations`` times
    (projections onto convex sets: the affine set of images with those correlations and the
    box of valid pixels), then the pixels are rounded to uint8.
    """
    pixels = _as_array(images)
    n, _, h, w = pixels.shape
    c = carrier(key, h, w, strength=strength)
    offset = c.dither + payload.to_bits() * (c.step / 2)  # (bits,)
    s = _correlations(pixels, c)
    target = offset + c.step * np.round((s - offset) / c.step)  # (N, bits)
    marked = pixels
    for _ in range(iterations):
        change = (target - s) @ c.patterns.T  # (N, H*W), the luma change
        marked = np.clip(marked + change.reshape(n, 1, h, w), 0.0, 255.0)
        s = _correlations(marked, c)
    return torch.from_numpy(np.round(marked).astype(np.uint8))


@dataclass(frozen=True)
class Reading:
    """What the decoder read from one image: ``payload`` is None when it carries no valid mark
    under the key; ``bits`` are the raw bits; ``margin`` is the smallest distance of a
    correlation from its decision boundary, in grey levels (``step / 4`` at most)."""

    payload: Payload | None
    bits: np.ndarray
    margin: float

    @property
    def marked(self) -> bool:
        return self.payload is not None


def read_bits(
    images: Tensor, key: WatermarkKey, *, strength: float = DEFAULT_STRENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """The raw bits, uint8 (N, bits), read with ``key``, and each bit's margin: the distance of
    its correlation from the decision boundary, in grey levels, float (N, bits)."""
    pixels = _as_array(images)
    c = carrier(key, pixels.shape[2], pixels.shape[3], strength=strength)
    phase = np.mod((_correlations(pixels, c) - c.dither) / c.step, 1.0)  # 0 -> bit 0, 0.5 -> 1
    bits = ((phase >= 0.25) & (phase < 0.75)).astype(np.uint8)
    margin = np.abs(np.mod(phase, 0.5) - 0.25) * c.step  # to the nearer of 0.25 and 0.75
    return bits, margin


def decode(
    images: Tensor, key: WatermarkKey, *, strength: float = DEFAULT_STRENGTH
) -> list[Reading]:
    """Read each image's mark under ``key``; a payload is returned only when its CRC holds."""
    bits, margins = read_bits(images, key, strength=strength)
    return [
        Reading(Payload.from_bits(b), b, float(m.min())) for b, m in zip(bits, margins, strict=True)
    ]


# ----------------------------------------------------------------------------- files


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """An image file as uint8 (1, C, H, W), as :func:`decode` wants it: greyscale stays one
    channel, a colour JPEG gives its own Y plane (the luma the decoder reads, before chroma
    upsampling and the conversion to RGB clip it), anything else RGB as stored. WatermarkError
    names the file when it cannot be read."""
    try:
        return read_image(path, AS_STORED)[None]
    except ImageReadError as exc:
        raise WatermarkError(str(exc)) from None


@dataclass(frozen=True)
class Provenance:
    """What a published PNG says about where it came from (tEXt chunks)."""

    model: str
    version: str
    run_id: str
    key_id: str
    scheme: str = SCHEME


def save_png(image: Tensor, path: str | os.PathLike[str], provenance: Provenance) -> None:
    """Write one (C, H, W) uint8 image as PNG with ``provenance`` in tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for name in PNG_KEYS:
        info.add_text(f"diffpipe:{name}", str(getattr(provenance, name)))
    arr = image.permute(1, 2, 0).numpy()  # (H, W, C)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path, pnginfo=info)


def read_png_provenance(path: str | os.PathLike[str]) -> Provenance | None:
    """The provenance tEXt chunks of a PNG file, or None when it has none (or is no PNG)."""
    try:
        with Image.open(path) as img:
            text = dict(getattr(img, "text", {}) or {})
    except (OSError, ValueError):
        return None
    fields = {name: text.get(f"diffpipe:{name}") for name in PNG_KEYS}
    if any(v is None for v in fields.values()):
        return None
    return Provenance(**{k: str(v) for k, v in fields.items()})


def round_trip(images: Tensor, *, jpeg_quality: int | None = None) -> Tensor:
    """``images`` (uint8 (N, C, H, W)) saved with Pillow and read back as :func:`load_image`
    reads files: as PNG when ``jpeg_quality`` is None, else as JPEG at that quality (Pillow's
    default 4:2:0 chroma; colour JPEGs come back as their one-channel Y plane)."""
    out = []
    for image in images:
        arr = image.permute(1, 2, 0).numpy()  # (H, W, C)
        buffer = io.BytesIO()
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        if jpeg_quality is None:
            pil.save(buffer, format="PNG")
        else:
            pil.save(buffer, format="JPEG", quality=jpeg_quality)
        out.append(image_tensor(open_image(buffer.getvalue(), AS_STORED)))
    return torch.stack(out) if out else images.clone()
