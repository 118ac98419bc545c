"""The captioned shapes set: one coloured square, circle or triangle on a dark background, in one
cell of a 3 x 3 grid, with a caption naming all three ("a red square at the top left")."""

from __future__ import annotations

import numpy as np
import torch

from diffusion_core.config import DataConfig
from diffusion_core.data.dataset import ImageDataset, match_channels

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
    ("a red square at the top left"), and ``diffusion_core.evaluation.shapes`` reads them back.
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
        images=match_channels(rgb, 1 if grey else 3),
        labels=torch.as_tensor(shape_idx, dtype=torch.long),
        class_names=list(SHAPE_NAMES),
        captions=captions,
        source=f"synthetic shapes (n={n}, seed={cfg.split_seed})",
    )
