"""Figures for reports: noise schedules, the forward process, loss curves, samples, quality vs cost.

Every function draws on a standalone :class:`matplotlib.figure.Figure` rendered by the Agg canvas
(no pyplot, no global backend switch, safe in worker threads), writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter
from torch import Tensor

from diffusion_core.io import make_grid
from diffusion_core.schedules import NoiseSchedule

DPI = 120
PALETTE = ("#3366aa", "#ee7733", "#229977", "#cc3355", "#8855bb", "#997744", "#55aacc", "#777777")
MAX_PROGRESSION_ROWS = 6
_MIN_CELL_PIXELS = 64  # small images are upscaled (nearest) to at least this many pixels


_LABELS = {
    "nfe": "network evaluations (NFE)",
    "wall_seconds": "wall-clock time (s)",
    "fid": "FID (lower is better)",
    "kid": "KID (lower is better)",
    "inception_score": "Inception Score (higher is better)",
    "is": "Inception Score (higher is better)",
}


@contextmanager
def _figure(
    path: str | Path, figsize: tuple[float, float], *, tight: bool = True
) -> Iterator[Figure]:
    """A styled figure that is saved to ``path`` as PNG when the block exits without error."""
    with matplotlib.rc_context(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.labelsize": 10,
            "axes.labelcolor": "#333333",
            "axes.edgecolor": "#999999",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": "#e6e6e6",
            "grid.linewidth": 0.8,
            "axes.axisbelow": True,
            "xtick.color": "#555555",
            "ytick.color": "#555555",
            "legend.frameon": False,
            "figure.facecolor": "white",
            "savefig.facecolor": "white",
        }
    ):
        fig = Figure(figsize=figsize, dpi=DPI)
        FigureCanvasAgg(fig)
        yield fig
        if tight:
            fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=DPI)


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _label(key: str) -> str:
    return _LABELS.get(key, key.replace("_", " "))


def _to_display(image: Tensor) -> np.ndarray:
    """(C, H, W) uint8 to an (H, W, 3) uint8 array for ``imshow``."""
    arr = image.detach().cpu().permute(1, 2, 0).numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 (N, C, H, W) with C in (1, 3), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise ValueError("no images to plot")


# ---------------------------------------------------------------------------------- schedules


def plot_schedules(
    path: str | Path,
    *,
    num_steps: int = 1000,
    names: Sequence[str] = ("linear", "cosine", "sigmoid"),
    highlight: str | None = None,
) -> Path:
    """beta_t (log scale), alpha_bar_t and log-SNR against t, one line per named schedule.

    ``highlight`` names the schedule to draw in bold (the one a model uses); the others thin.
    """
    if not names:
        raise ValueError("no schedule names given")
    schedules = {name: NoiseSchedule.from_name(name, num_steps) for name in names}
    t = np.arange(num_steps)
    with _figure(path, (11.5, 3.7)) as fig:
        ax_beta, ax_ab, ax_snr = fig.subplots(1, 3)
        for i, (name, sched) in enumerate(schedules.items()):
            bold = highlight is None or name == highlight
            style = {
                "color": _color(i),
                "linewidth": 2.4 if highlight is not None and bold else 1.8 if bold else 1.2,
                "alpha": 1.0 if bold else 0.55,
                "label": f"{name} (this model)" if highlight == name else name,
            }
            ax_beta.plot(t, sched.betas.numpy(), **style)
            ax_ab.plot(t, sched.alphas_cumprod.numpy(), **style)
            ax_snr.plot(t, sched.log_snr.numpy(), **style)
        ax_beta.set_yscale("log")
        ax_beta.set_title(r"Noise added per step $\beta_t$")
        ax_beta.set_ylabel(r"$\beta_t$ (log scale)")
        ax_ab.set_title(r"Signal kept $\bar\alpha_t$")
        ax_ab.set_ylabel(r"$\bar\alpha_t = \prod_{s \leq t} (1 - \beta_s)$")
        ax_ab.set_ylim(-0.02, 1.02)
        ax_snr.set_title("Signal-to-noise ratio")
        ax_snr.set_ylabel(r"$\log \mathrm{SNR} = \log \bar\alpha_t / (1 - \bar\alpha_t)$")
        ax_snr.axhline(0.0, color="#aaaaaa", linewidth=0.8, linestyle=":")
        for ax in (ax_beta, ax_ab, ax_snr):
            ax.set_xlabel("timestep t")
            ax.set_xlim(0, num_steps - 1)
        ax_ab.legend(title="schedule", loc="upper right")
    return Path(path)


# -------------------------------------------------------------------------- noise progression


def plot_noise_progression(
    path: str | Path,
    images: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: Sequence[int] = (0, 50, 100, 250, 500, 750, 999),
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """x_t ~ q(x_t | x_0) for up to six images (rows) at the given timesteps (columns).

    Each row uses one noise draw for all of its columns, so the columns differ only in t.
    """
    _check_images(images)
    steps = [int(s) for s in steps]
    if not steps:
        raise ValueError("no timesteps given")
    bad = [s for s in steps if not 0 <= s < schedule.num_steps]
    if bad:
        raise ValueError(f"timesteps {bad} are outside [0, {schedule.num_steps - 1}]")
    x0 = images[:MAX_PROGRESSION_ROWS].to(torch.float32) / 127.5 - 1.0
    rows, cols = len(x0), len(steps)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    h, w = x0.shape[-2:]
    factor = max(1, math.ceil(_MIN_CELL_PIXELS / max(h, w)))
    alpha_bar = schedule.alphas_cumprod
    cell = 0.95
    with _figure(path, (cell * cols + 0.3, cell * rows + 0.9), tight=False) as fig:
        axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
        for j, step in enumerate(steps):
            t = torch.full((rows,), step, dtype=torch.long)
            x_t = schedule.q_sample(x0, t, noise)
            x_t = ((x_t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            if factor > 1:
                x_t = x_t.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
            for i in range(rows):
                ax = axes[i, j]
                ax.imshow(_to_display(x_t[i]), interpolation="nearest")
                ax.set_axis_off()
            axes[0, j].set_title(
                f"t = {step}\n" + r"$\bar\alpha_t$" + f" = {float(alpha_bar[step]):.2f}",
                fontsize=9,
                fontweight="normal",
            )
        fig.suptitle(
            title or f"Forward process q(x_t | x_0), {schedule.num_steps}-step schedule",
            fontsize=11,
            fontweight="bold",
        )
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, wspace=0.06, hspace=0.06)
        fig.subplots_adjust(top=1 - 0.9 / (cell * rows + 0.9))
    return Path(path)


# -------------------------------------------------------------------------------- loss curve


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (0.04, 0.2) rather than 4e-02."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def ema_smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average with the start-up bias removed (as TensorBoard smooths)."""
    out = np.empty(len(values), dtype=np.float64)
    acc = 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * float(v)
        out[i] = acc / (1 - weight ** (i + 1)) if weight > 0 else float(v)
    return out


def _finite_series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = []
    for record in history:
        step, value = record.get("step"), record.get(key)
        if step is None or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            pairs.append((float(step), value))
    pairs.sort(key=lambda p: p[0])
    arr = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def plot_loss_curve(
    path: str | Path,
    history: Sequence[Mapping[str, Any]],
    *,
    smoothing: float | None = None,
    title: str = "Training loss",
) -> Path:
    """Raw loss points with an EMA-smoothed line; log y when the loss spans a decade or more.

    Records are ``{"step": int, "loss": float}``, optionally with ``"lr"``, which then gets its
    own panel below. ``smoothing`` is the EMA weight in [0, 1); by default it grows with the
    number of points.
    """
    steps, loss = _finite_series(history, "loss")
    if len(loss) == 0:
        raise ValueError("history has no finite loss values")
    if smoothing is None:
        lag = len(loss) / 40.0  # an EMA with weight w lags by about w / (1 - w) points
        smoothing = float(np.clip(lag / (1.0 + lag), 0.0, 0.98))
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
    lr_steps, lr = _finite_series(history, "lr")
    has_lr = len(lr) > 0
    with _figure(path, (8.0, 5.2 if has_lr else 4.0)) as fig:
        if has_lr:
            ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        else:
            ax, ax_lr = fig.subplots(1, 1), None
        ax.plot(
            steps,
            loss,
            color=_color(0),
            alpha=0.35,
            linewidth=0.8,
            marker="o" if len(loss) <= 200 else None,
            markersize=2.5,
            label="loss (raw)",
        )
        ax.plot(
            steps,
            ema_smooth(loss.tolist(), smoothing),
            color=_color(0),
            linewidth=2.0,
            label=f"EMA (weight {smoothing:.2f})",
        )
        positive = bool((loss > 0).all())
        if positive and loss.max() / loss.min() >= 10.0:
            ax.set_yscale("log")
            for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.set_ylabel("loss (log scale)")
        else:
            ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend(loc="upper right")
        if ax_lr is not None:
            ax_lr.plot(lr_steps, lr, color=_color(1), linewidth=1.5)
            ax_lr.set_ylabel("learning rate")
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax_lr.set_xlabel("step")
        else:
            ax.set_xlabel("step")
    return Path(path)


# ------------------------------------------------------------------------------- sample grid


def plot_sample_grid(
    path: str | Path,
    images: Tensor,
    *,
    labels: Tensor | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    per_class: int = 10,
    scale: int = 4,
    title: str | None = None,
) -> Path:
    """Samples as a grid: one row per class named at the left when ``labels`` are given, else
    a square grid of every image. Images are upscaled ``scale`` times with nearest neighbours.
    """
    _check_images(images)
    if per_class < 1 or scale < 1:
        raise ValueError(f"per_class and scale must be >= 1, got {per_class}, {scale}")
    n, c, h, w = images.shape
    row_names: list[str] = []
    if labels is not None:
        label_list = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
        if len(label_list) != n:
            raise ValueError(f"{len(label_list)} labels for {n} images")
        if class_names is not None and any(not 0 <= k < len(class_names) for k in label_list):
            raise ValueError(f"labels must lie in [0, {len(class_names)}) (one per class name)")
        tiles, present = [], []
        blank = torch.zeros((c, h, w), dtype=torch.uint8)
        for k in sorted(set(label_list)):
            idx = [i for i, v in enumerate(label_list) if v == k][:per_class]
            tiles += [images[i] for i in idx] + [blank] * (per_class - len(idx))
            present += [True] * len(idx) + [False] * (per_class - len(idx))
            row_names.append(class_names[k] if class_names is not None else str(k))
        stacked, nrow = torch.stack(tiles), per_class
    else:
        stacked, present = images, [True] * n
        nrow = max(1, math.ceil(math.sqrt(n)))
    grid = make_grid(stacked, nrow=nrow, scale=scale)
    # Paint the padding and the empty cells white so the tiles read as separate images.
    mask = torch.tensor(present, dtype=torch.uint8)[:, None, None, None] * 255
    covered = make_grid(mask.expand(len(present), 1, h, w).contiguous(), nrow=nrow, scale=scale)
    display = _to_display(grid)
    display[covered[0].numpy() == 0] = 255
    gh, gw = display.shape[:2]
    label_width = 0.0
    if row_names:
        label_width = 0.25 + 0.075 * max(len(name) for name in row_names)
    fig_w = gw / DPI + label_width + 0.2
    fig_h = gh / DPI + (0.5 if title else 0.15)
    with _figure(path, (fig_w, fig_h)) as fig:
        ax = fig.subplots(1, 1)
        ax.imshow(display, interpolation="nearest")
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_xticks([])
        if row_names:
            cell_h = (h + 1) * scale
            ax.set_yticks([scale + i * cell_h + h * scale / 2 - 0.5 for i in range(len(row_names))])
            ax.set_yticklabels(row_names)
            ax.tick_params(axis="y", length=0, labelsize=10, labelcolor="#333333")
        else:
            ax.set_yticks([])
        if title:
            ax.set_title(title)
    return Path(path)
