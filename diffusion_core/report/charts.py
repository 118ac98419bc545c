"""The report's comparison charts: a metric against sampling cost (the sweep), two sample sets
drawn with the same seeds side by side (challenger and champion), and each metric across the
registered versions. Same style as :mod:`diffusion_core.report.plots`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from diffusion_core.report.plots import (
    DPI,
    _check_images,
    _color,
    _figure,
    _label,
    _PlainLogFormatter,
    _to_display,
)

# ---------------------------------------------------------------------------- metric vs cost


def plot_metric_vs_cost(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "fid",
    cost: str = "nfe",
    title: str | None = None,
) -> Path:
    """``metric`` against ``cost`` (log x), one line per sampler, with a band between
    ``<metric>_low`` and ``<metric>_high`` where every point of that sampler has them."""
    by_sampler: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
    for row in rows:
        x, y = row.get(cost), row.get(metric)
        if x is None or y is None or not (math.isfinite(float(x)) and math.isfinite(float(y))):
            continue
        low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
        by_sampler.setdefault(str(row.get("sampler", "?")), []).append(
            (
                float(x),
                float(y),
                None if low is None else float(low),
                None if high is None else float(high),
            )
        )
    if not by_sampler:
        raise ValueError(f"no rows with finite {cost!r} and {metric!r}")
    all_x = [p[0] for points in by_sampler.values() for p in points]
    with _figure(path, (7.5, 4.5)) as fig:
        ax = fig.subplots(1, 1)
        for i, (sampler, points) in enumerate(sorted(by_sampler.items())):
            points.sort(key=lambda p: p[0])
            xs = np.array([p[0] for p in points])
            ys = np.array([p[1] for p in points])
            color = _color(i)
            if all(p[2] is not None and p[3] is not None for p in points):
                lows = np.array([p[2] for p in points], dtype=np.float64)
                highs = np.array([p[3] for p in points], dtype=np.float64)
                ax.fill_between(xs, lows, highs, color=color, alpha=0.15, linewidth=0)
            ax.plot(xs, ys, color=color, marker="o", markersize=4.5, linewidth=1.8, label=sampler)
        if min(all_x) > 0:
            ax.set_xscale("log")
            unique_x = sorted(set(all_x))
            if len(unique_x) <= 12:
                ax.set_xticks(unique_x)
                ax.set_xticklabels([f"{v:g}" for v in unique_x])
                ax.minorticks_off()
            else:
                ax.xaxis.set_major_formatter(_PlainLogFormatter())
                ax.xaxis.set_minor_formatter(
                    _PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5))
                )
        ax.set_xlabel(_label(cost) + (", log scale" if min(all_x) > 0 else ""))
        ax.set_ylabel(_label(metric))
        ax.set_title(title or f"{metric.upper()} against {_label(cost).split(' (')[0]}")
        ax.legend(title="sampler", loc="best")
    return Path(path)


# ------------------------------------------------------------------- champion and challenger


def plot_side_by_side(
    path: str | Path,
    left: Tensor,
    right: Tensor,
    *,
    titles: tuple[str, str],
    scale: int = 4,
) -> Path:
    """Two sets of images drawn with the same seeds and labels, as two grids side by side
    (image i of one set beside image i of the other, at the same place)."""
    _check_images(left)
    _check_images(right)
    if left.shape != right.shape:
        raise ValueError(
            f"the two sets differ in shape: {tuple(left.shape)} vs {tuple(right.shape)}"
        )
    per_row = max(1, min(10, math.ceil(math.sqrt(len(left)))))
    grids = [_display_grid(images, per_row, scale) for images in (left, right)]
    height, width = grids[0].shape[:2]
    with _figure(path, (2 * width / DPI + 0.6, height / DPI + 0.6)) as fig:
        for ax, grid, title in zip(fig.subplots(1, 2), grids, titles, strict=True):
            ax.imshow(grid, interpolation="nearest")
            ax.set_title(title)
            ax.set_axis_off()
    return Path(path)


def _display_grid(images: Tensor, per_row: int, scale: int) -> np.ndarray:
    """uint8 (N, C, H, W) as one (H', W', 3) array, ``per_row`` images a row, each upscaled."""
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    rows = -(-n // per_row)
    pad = 2
    canvas = np.full(
        (rows * (h * scale + pad) + pad, per_row * (w * scale + pad) + pad, 3), 255, np.uint8
    )
    for i in range(n):
        tile = _to_display(images[i]).repeat(scale, 0).repeat(scale, 1)
        r, k = divmod(i, per_row)
        y, x = pad + r * (h * scale + pad), pad + k * (w * scale + pad)
        canvas[y : y + h * scale, x : x + w * scale] = tile
    return canvas


def plot_metric_trend(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[tuple[str, str]],
    *,
    highlight: Sequence[str] = (),
) -> Path:
    """Each metric (``(column, label)``) across the registered versions of ``rows`` (a
    ``version`` column), one small panel a metric; versions in ``highlight`` are marked."""
    shown = [
        (column, label)
        for column, label in metrics
        if any(is_finite(row.get(column)) for row in rows)
    ]
    if not shown:
        raise ValueError("no metric with a finite value in any row")
    with _figure(path, (3.2 * len(shown), 2.8)) as fig:
        axes = np.atleast_1d(fig.subplots(1, len(shown)))
        for i, (ax, (column, label)) in enumerate(zip(axes, shown, strict=True)):
            points = [
                (int(row["version"]), float(row[column]))
                for row in rows
                if is_finite(row.get(column))
            ]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, color=_color(i), marker="o", markersize=4, linewidth=1.6)
            for x, y in points:
                if str(x) in highlight:
                    ax.plot([x], [y], marker="o", markersize=9, fillstyle="none", color="#222222")
            ax.set_xticks(xs)
            ax.set_xlabel("version")
            ax.set_title(label)
    return Path(path)


def is_finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
