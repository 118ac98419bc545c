"""Inpainting evaluation: standard masks, masked-region error, seam score, RePaint vs replacement.

Masks are (N or 1, 1, H, W) float tensors of {0, 1} with 1 = KNOWN, as ``repaint.inpaint`` takes
them. Images are uint8 (N, C, H, W); every statistic is on pixel values scaled to [0, 1].

- Masked-region error: the MSE over the unknown pixels (all channels, pooled over the images) and
  its PSNR, ``10 log10(1 / MSE)``.
- Seam score: the mean absolute difference across the mask boundary, over every pair of
  4-neighbouring pixels of which one is known and the other unknown. The same statistic on the
  real image is the reference: a completion that joins as smoothly as the real image scores the
  reference, a visible seam scores above it (ratio > 1), a blurred fill below it.
- RePaint (Lugmayr et al. 2022) with ``resample == 1`` is plain replacement: the known region is
  re-noised and pasted in at every step without forward jumps.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from diffusion_core.config import MASK_KINDS, InpaintEvalConfig
from diffusion_core.io import psnr_from_mse
from diffusion_core.model import ModelCard
from diffusion_core.repaint import repaint_schedule
from diffusion_core.sampling import InpaintRequest, SampleRequest, inpaint


class InpaintingError(RuntimeError):
    """An inpainting that changed the known region: a bug, never a quality problem."""


# ------------------------------------------------------------------------------------ masks


def centre_mask(size: int) -> Tensor:
    """A centre box of half the side (a quarter of the area) unknown; (1, 1, H, W)."""
    mask = torch.ones(1, 1, size, size)
    lo, hi = size // 4, size - size // 4
    mask[..., lo:hi, lo:hi] = 0
    return mask


def half_mask(size: int) -> Tensor:
    """The right half unknown; (1, 1, H, W)."""
    mask = torch.ones(1, 1, size, size)
    mask[..., size // 2 :] = 0
    return mask


def stroke_mask(num: int, size: int, *, seed: int = 0, strokes: int = 3) -> Tensor:
    """Free-form brush strokes, different for each image and the same for a seed; (N, 1, H, W).

    Each stroke is a polyline of four segments from a random start, in random directions, of
    length between a quarter and a half of the side, drawn ``max(1, size // 8)`` pixels wide.
    """
    rng = np.random.default_rng(seed)
    width = max(1, size // 8)
    out = []
    for _ in range(num):
        image = Image.new("L", (size, size), 255)
        draw = ImageDraw.Draw(image)
        for _ in range(strokes):
            points = [tuple(rng.uniform(0, size - 1, 2))]
            for _ in range(4):
                angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(size / 4, size / 2)
                x, y = points[-1]
                x = float(np.clip(x + length * math.cos(angle), 0, size - 1))
                y = float(np.clip(y + length * math.sin(angle), 0, size - 1))
                points.append((x, y))
            draw.line(points, fill=0, width=width, joint="curve")
        out.append(torch.from_numpy(np.asarray(image) >= 128).float())
    return torch.stack(out)[:, None]  # (N, 1, H, W)


def standard_mask(kind: str, num: int, size: int, *, seed: int = 0) -> Tensor:
    """The named standard mask for ``num`` images of side ``size`` (1 = known)."""
    if kind == "centre":
        mask = centre_mask(size)
    elif kind == "half":
        mask = half_mask(size)
    elif kind == "strokes":
        mask = stroke_mask(num, size, seed=seed)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
    known = mask.flatten(1).sum(1)
    if bool((known == 0).any() or (known == mask[0].numel()).any()):
        raise ValueError(f"{kind} mask at size {size} leaves no known or no unknown pixel")
    return mask


# ---------------------------------------------------------------------------------- metrics


def _unit(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float64) / 255.0


def masked_mse(filled: Tensor, truth: Tensor, mask: Tensor) -> float:
    """MSE on [0, 1] over the unknown pixels (mask == 0), pooled over images and channels."""
    unknown = (mask == 0).expand_as(truth)
    if not bool(unknown.any()):
        raise ValueError("the mask has no unknown pixel")
    return float(((_unit(filled) - _unit(truth)) ** 2)[unknown].mean())


def known_changed(filled: Tensor, truth: Tensor, mask: Tensor) -> int:
    """How many known-region values (pixels x channels) differ from the truth."""
    known = (mask == 1).expand_as(truth)
    return int((filled != truth)[known].sum())


def seam_score(images: Tensor, mask: Tensor) -> float:
    """Mean |x_p - x_q| on [0, 1] over 4-neighbour pairs (p, q) that straddle the mask boundary."""
    x = _unit(images)
    m = (mask == 1).expand(x.shape[0], 1, *x.shape[-2:])  # (N, 1, H, W)
    across_w = (m[..., :, 1:] != m[..., :, :-1]).expand(-1, x.shape[1], -1, -1)
    across_h = (m[..., 1:, :] != m[..., :-1, :]).expand(-1, x.shape[1], -1, -1)
    diffs = torch.cat(
        [
            (x[..., :, 1:] - x[..., :, :-1]).abs()[across_w],
            (x[..., 1:, :] - x[..., :-1, :]).abs()[across_h],
        ]
    )
    if len(diffs) == 0:
        raise ValueError("the mask has no boundary between known and unknown pixels")
    return float(diffs.mean())


@dataclass(frozen=True)
class InpaintScore:
    mse: float
    psnr: float
    seam: float
    seam_real: float
    known_changed: int

    @property
    def seam_ratio(self) -> float:
        return self.seam / self.seam_real if self.seam_real > 0 else math.inf


def score_inpainting(filled: Tensor, truth: Tensor, mask: Tensor) -> InpaintScore:
    """Every statistic of one batch of completions against the ground truth."""
    mse = masked_mse(filled, truth, mask)
    return InpaintScore(
        mse=mse,
        psnr=psnr_from_mse(mse, peak=1.0),
        seam=seam_score(filled, mask),
        seam_real=seam_score(truth, mask),
        known_changed=known_changed(filled, truth, mask),
    )


# ------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Method:
    name: str
    jump_length: int
    resample: int

    def nfe(self, steps: int) -> int:
        """Network evaluations of one RePaint run over a grid of ``steps`` points."""
        positions = repaint_schedule(steps, jump_length=self.jump_length, resample=self.resample)
        return sum(b > a for a, b in itertools.pairwise(positions))


def methods(cfg: InpaintEvalConfig) -> list[Method]:
    """RePaint with the configured resampling, and plain replacement (resample 1)."""
    return [Method("repaint", cfg.jump_length, cfg.resample), Method("replacement", 1, 1)]


@dataclass(frozen=True)
class InpaintResult:
    rows: list[dict[str, Any]]  # one per (mask kind, method)
    examples: Tensor  # uint8 (masks x 4 x k, C, H, W): masked input, each method, real; k each


def _masked_input(images: Tensor, mask: Tensor) -> Tensor:
    """The input as the model sees it: the unknown region shown mid-grey."""
    return torch.where(mask == 1, images, torch.full_like(images, 128))


def evaluate_inpainting(
    net: nn.Module,
    card: ModelCard,
    request: SampleRequest,
    images: Tensor,
    cfg: InpaintEvalConfig,
    *,
    examples: int = 4,
    dtype: torch.dtype | None = None,
) -> InpaintResult:
    """One row per (mask kind, method) on the first ``cfg.num_images`` of uint8 ``images``
    (N, C, H, W), completed without class labels with the steps, spacing, variance and seed of
    ``request`` (or the card's); and, per mask kind, the first ``examples`` images as rows of
    masked input, each method's completion and the real image.

    Raises ``InpaintingError`` when a completion changed any known pixel.
    """
    keep = {"steps", "spacing", "guidance_scale", "variance", "clip_x0", "seed", "batch_size"}
    base = request.model_dump(include=keep, exclude_none=True)
    steps = request.knobs(card).steps
    images = images[: cfg.num_images]
    k = min(examples, len(images))
    rows, shown = [], []
    for kind in cfg.masks:
        mask = standard_mask(kind, len(images), card.image_size, seed=cfg.seed)
        shown.append(_masked_input(images[:k], mask[:k]))
        for method in methods(cfg):
            t0 = time.perf_counter()
            method_request = InpaintRequest(
                **base, jump_length=method.jump_length, resample=method.resample
            )
            filled = inpaint(net, card, method_request, images, mask, dtype=dtype)
            seconds = time.perf_counter() - t0
            score = score_inpainting(filled, images, mask)
            if score.known_changed:
                raise InpaintingError(
                    f"{method.name} inpainting with the {kind} mask changed "
                    f"{score.known_changed} known pixel values"
                )
            shown.append(filled[:k])
            rows.append(
                {
                    "mask": kind,
                    "method": method.name,
                    "resample": method.resample,
                    "jump_length": method.jump_length,
                    "nfe": method.nfe(steps),
                    "mse": score.mse,
                    "psnr": score.psnr,
                    "seam": score.seam,
                    "seam_real": score.seam_real,
                    "seam_ratio": score.seam_ratio,
                    "known_changed": score.known_changed,
                    "num_images": len(images),
                    "seconds": round(seconds, 3),
                }
            )
        shown.append(images[:k])
    return InpaintResult(rows, torch.cat(shown))


def inpainting_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Flat metrics for tracking: ``inpaint/<mask>/<method>/<stat>`` and the exactness flag."""
    out: dict[str, float] = {}
    for row in rows:
        key = f"inpaint/{row['mask']}/{row['method']}"
        for stat in ("mse", "psnr", "seam", "seam_ratio"):
            out[f"{key}/{stat}"] = float(row[stat])
        out[f"inpaint/{row['mask']}/seam_real"] = float(row["seam_real"])
    out["inpaint/known_region_exact"] = float(all(row["known_changed"] == 0 for row in rows))
    return out
