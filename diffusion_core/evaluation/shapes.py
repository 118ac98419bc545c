"""An analytic detector for the captioned ``shapes`` set: does a sample show what its prompt says?

From pixel statistics alone, no learned weights:
- colour: a pixel takes a palette colour when it lies within half the smallest distance between
  two colours of the palette and background (so it is unambiguously that colour); the most
  frequent palette colour is the shape's colour. Pixels near no colour (noise, tinted
  background) count for nothing;
- position: the grid cell (3 x 3) holding the centroid of the dominant colour's pixels;
- shape: the fill ratio of those pixels' bounding box (square ~1, circle ~pi/4, triangle ~1/2)
  and their vertical asymmetry (an upward triangle has its mass low), matched to the nearest of
  the features of the data's own masks at this image size.

On the dataset's own images it is exact (see ``tests/test_text.py``); on samples it measures
prompt adherence per attribute.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffusion_core.data.shapes import (
    SHAPE_BACKGROUND,
    SHAPE_COLOURS,
    SHAPE_NAMES,
    SHAPE_POSITIONS,
    shape_mask,
)

_CAPTION = re.compile(
    r"^an? (?:(?P<colour>\w+) )?(?P<shape>\w+) (?:at|on|in) the (?P<position>[\w ]+)$"
)
_GRID = [list(SHAPE_POSITIONS)[row * 3 : row * 3 + 3] for row in range(3)]  # [row][column]


@dataclass(frozen=True)
class ShapeAttributes:
    shape: str
    colour: str | None  # None: greyscale captions name no colour
    position: str


def parse_caption(caption: str) -> ShapeAttributes:
    """The attributes a ``shapes`` caption names ("a red square at the top left")."""
    m = _CAPTION.match(caption.strip())
    if (
        m is None
        or m["shape"] not in SHAPE_NAMES
        or m["position"] not in SHAPE_POSITIONS
        or (m["colour"] is not None and m["colour"] not in SHAPE_COLOURS)
    ):
        raise ValueError(
            f"{caption!r} is not a shapes caption ('a|an [colour] shape at|on|in the position'; "
            f"shapes {SHAPE_NAMES}, colours {tuple(SHAPE_COLOURS)}, "
            f"positions {tuple(SHAPE_POSITIONS)})"
        )
    return ShapeAttributes(m["shape"], m["colour"], m["position"])


def _features(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio of the bounding box, vertical asymmetry) of a non-empty boolean mask."""
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(height * width)
    middle = (ys.min() + ys.max()) / 2
    asymmetry = (np.sum(ys > middle) - np.sum(ys < middle)) / float(len(ys))
    return fill, asymmetry


def _templates(size: int) -> tuple[np.ndarray, list[str]]:
    """Features of every shape at every grid position at this image size: (S * P, 2), names."""
    feats, names = [], []
    for shape in SHAPE_NAMES:
        for centre in SHAPE_POSITIONS.values():
            feats.append(_features(shape_mask(shape, centre, size)))
            names.append(shape)
    return np.asarray(feats), names


def detect(images: Tensor) -> list[ShapeAttributes | None]:
    """The shape, colour and grid cell in each uint8 RGB image (N, 3, H, W); None where no pixel
    is unambiguously a palette colour."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"shapes detector needs uint8 RGB images (N, 3, H, W), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    size_h, size_w = images.shape[-2:]
    templates, template_names = _templates(int(size_h))
    colour_names = list(SHAPE_COLOURS)
    palette = torch.tensor([SHAPE_BACKGROUND, *SHAPE_COLOURS.values()], dtype=torch.float32)
    gaps = torch.cdist(palette, palette) + torch.eye(len(palette)) * 1e9
    radius = float(gaps.min()) / 2
    pixels = images.float().permute(0, 2, 3, 1)  # (N, H, W, 3)
    distance, nearest = torch.cdist(pixels.reshape(-1, 3), palette).min(dim=1)
    nearest[distance > radius] = 0  # near no colour: not part of the shape
    per_pixel = nearest.view(pixels.shape[:3]).numpy()  # (N, H, W): 0 none, k colour k-1
    out: list[ShapeAttributes | None] = []
    for labels in per_pixel:
        counts = np.bincount(labels.ravel(), minlength=len(palette))[1:]
        if counts.sum() == 0:
            out.append(None)
            continue
        colour = int(counts.argmax())
        mask = labels == colour + 1
        ys, xs = np.nonzero(mask)
        col = min(int((xs.mean() + 0.5) * 3 / size_w), 2)
        row = min(int((ys.mean() + 0.5) * 3 / size_h), 2)
        distance = np.linalg.norm(templates - np.asarray(_features(mask)), axis=1)
        shape = template_names[int(distance.argmin())]
        out.append(ShapeAttributes(shape, colour_names[colour], _GRID[row][col]))
    return out


def adherence(images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose detected shape, colour, position (and all three) match the
    prompt each was drawn for."""
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    wanted = [parse_caption(p) for p in prompts]
    found = detect(images)
    hits = {"shape": 0, "colour": 0, "position": 0, "all": 0}
    for w, f in zip(wanted, found, strict=True):
        if f is None:
            continue
        ok = {"shape": w.shape == f.shape, "colour": w.colour == f.colour}
        ok["position"] = w.position == f.position
        for key, value in ok.items():
            hits[key] += int(value)
        hits["all"] += int(all(ok.values()))
    return {key: value / len(prompts) for key, value in hits.items()}
