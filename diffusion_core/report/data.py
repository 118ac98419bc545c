"""What a run report shows (:class:`ReportData`) and how its numbers are written."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

SCHEDULE_NAMES = ("linear", "cosine", "sigmoid")
PROGRESSION_FRACTIONS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
MAX_UNCONDITIONAL_SAMPLES = 100
MAX_METRIC_CARDS = 4
FIGURE_FILES = (
    "samples.png",
    "sweep_nfe.png",
    "sweep_wall.png",
    "loss.png",
    "schedules.png",
    "noise_progression.png",
    "inpainting.png",
    "side_by_side.png",
    "metric_trend.png",
)

METRIC_NAMES = {
    "fid": "FID",
    "fid_half": "FID (half sample)",
    "fid_floor_half": "FID floor (real vs real)",
    "fid_half_over_floor": "FID / floor",
    "kid": "KID",
    "is": "Inception Score",
    "inception_score": "Inception Score",
    "precision": "Precision",
    "recall": "Recall",
    "classifier_accuracy": "Classifier accuracy",
    "accuracy": "Accuracy",
    "conditional_accuracy": "Conditional accuracy",
    "judge_holdout_accuracy": "Judge accuracy on real holdout",
    "num_samples": "Samples evaluated",
}
FLOOR_KEY = "fid_floor_half"


@dataclass
class ReportData:
    """Everything a run report shows; empty fields leave their section out."""

    title: str
    run_id: str
    model_name: str
    model_version: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "lr"?}
    samples: Tensor | None = None  # uint8 (N, C, H, W)
    labels: Tensor | None = None  # int (N,), one per sample
    class_names: list[str] | None = None
    real_images: Tensor | None = None  # uint8 (N, C, H, W) for the forward-process figure
    schedule_name: str | None = None
    num_steps: int = 1000
    safety: dict[str, Any] = field(default_factory=dict)  # counts and per-detector flag rates
    comparison: list[dict[str, Any]] = field(default_factory=list)  # rows against the champion
    sweep: list[dict[str, Any]] = field(default_factory=list)  # sampler, nfe, wall_seconds, fid
    notes: list[str] = field(default_factory=list)
    interval_level: float = 0.95
    inpainting: list[dict[str, Any]] = field(default_factory=list)  # inpaint_eval rows
    inpainting_examples: Tensor | None = None  # uint8, inpaint_eval.InpaintResult.examples
    promotion: dict[str, Any] = field(default_factory=dict)  # promoted, reason, previous_champion
    # More sample figures: (file name, uint8 (N, C, H, W) images, labels or None, caption).
    figures: list[tuple[str, Tensor, Tensor | None, str]] = field(default_factory=list)
    # Challenger and champion drawn with the same seeds and labels: (challenger, champion, labels).
    side_by_side: tuple[Tensor, Tensor, Tensor | None] | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)  # quality.class_rows
    champion_version: str | None = None


# ------------------------------------------------------------------------------- formatting


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fmt_value(value: Any) -> str:
    """A number for a table cell: 4 significant digits, thousands separators, '–' for NaN."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        if abs(value) >= 1000:
            return f"{value:,.1f}"
        return f"{value:.4g}"
    if value is None:
        return "–"
    return str(value)


def fmt_interval(interval: Sequence[float] | None) -> str:
    if interval is None:
        return ""
    low, high = interval
    return f"[{fmt_value(float(low))}, {fmt_value(float(high))}]"


def metric_name(key: str) -> str:
    return METRIC_NAMES.get(key.lower(), key)


def level_text(report: ReportData) -> str:
    return f"{report.interval_level * 100:g}%"


def is_rate(column: str, value: Any) -> bool:
    return "rate" in column.lower() and is_number(value) and 0.0 <= float(value) <= 1.0
