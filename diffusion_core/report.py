"""A self-contained HTML report of one run, and a short markdown summary that links to it.

:func:`write_report` writes ``index.html`` and ``img/*.png`` into one folder: relative links only,
inline styles, no scripts, fonts or stylesheets from elsewhere, so the folder can be copied to
object storage or opened from disk as it is. Every string that comes from a config, a dataset or
a user is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from torch import Tensor

from diffusion_core import plots
from diffusion_core.images import make_grid, to_pil
from diffusion_core.schedules import BETA_SCHEDULES, NoiseSchedule

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
)

_METRIC_NAMES = {
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


# ------------------------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
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


def _metric_name(key: str) -> str:
    return _METRIC_NAMES.get(key.lower(), key)


def _level(report: ReportData) -> str:
    return f"{report.interval_level * 100:g}%"


def _is_rate(column: str, value: Any) -> bool:
    return "rate" in column.lower() and _is_number(value) and 0.0 <= float(value) <= 1.0


# ------------------------------------------------------------------------------- html pieces


_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #eef1f4; --panel: #f6f8fa;
  --accent: #3366aa; --warn: #cc3355; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #f2f4f7;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
.wrap { max-width: 1120px; margin: 0 auto; padding: 0 24px; }
header.top { background: #1c2b3a; color: #fff; padding: 28px 0 20px; }
header.top h1 { margin: 0 0 8px; font-size: 1.75rem; line-height: 1.25; }
.meta { display: flex; flex-wrap: wrap; gap: 6px 22px; color: #c5d0dc; font-size: .92rem; }
.meta strong { color: #fff; font-weight: 600; }
.badge { display: inline-block; background: var(--accent); color: #fff; border-radius: 999px;
  padding: 0 10px; font-weight: 600; font-size: .85rem; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
nav.toc { margin-top: 16px; display: flex; flex-wrap: wrap; gap: 6px 8px; }
nav.toc a { color: #dbe5ef; text-decoration: none; font-size: .85rem; padding: 2px 10px;
  border: 1px solid #3b4f63; border-radius: 999px; }
nav.toc a:hover { background: #2a3d50; }
main section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 20px 24px; margin: 20px 0; }
main h2 { margin: 0 0 14px; padding-bottom: 8px; font-size: 1.2rem;
  border-bottom: 1px solid var(--soft); }
main h3 { margin: 18px 0 8px; font-size: 1rem; }
p.lead { margin: 0 0 12px; color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px;
  margin: 0 0 16px; }
.card { background: var(--panel); border-radius: 8px; padding: 12px 16px; }
.card .label { color: var(--muted); font-size: .78rem; text-transform: uppercase;
  letter-spacing: .05em; }
.card .value { font-size: 1.65rem; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: .82rem; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .93rem; }
th, td { padding: 7px 12px; text-align: left; border-bottom: 1px solid var(--soft);
  vertical-align: top; }
thead th { background: var(--panel); font-weight: 600; border-bottom: 1px solid var(--line); }
tbody tr:hover { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
span.key { color: var(--muted); font-size: .8rem; font-family: ui-monospace, SFMono-Regular,
  Menlo, Consolas, monospace; margin-left: 4px; }
td.interval { color: var(--muted); font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { display: inline-block; width: 110px; height: 8px; margin-left: 10px; overflow: hidden;
  vertical-align: middle; background: var(--soft); border-radius: 4px; }
.bar > span { display: block; height: 100%; background: var(--warn); }
figure { margin: 14px 0 6px; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--soft); border-radius: 6px; }
img.pixelated { image-rendering: pixelated; image-rendering: crisp-edges; }
figcaption { margin-top: 6px; color: var(--muted); font-size: .88rem; }
ul.notes { margin: 0; padding-left: 20px; }
.decision { border-radius: 8px; padding: 12px 16px; margin: 0 0 14px; background: var(--panel);
  border-left: 5px solid var(--muted); }
.decision.promoted { background: #eaf6ee; border-left-color: #2e8b57; }
.decision .verdict { font-weight: 650; font-size: 1.05rem; }
.decision .why { color: var(--muted); }
ul.notes li { margin: 4px 0; }
details summary { cursor: pointer; font-weight: 600; }
pre { background: var(--panel); border-radius: 6px; padding: 12px 14px; overflow: auto;
  font-size: .84rem; line-height: 1.45; }
footer { color: var(--muted); font-size: .82rem; text-align: center; padding: 8px 0 36px; }
@media (max-width: 640px) {
  .wrap { padding: 0 12px; }
  main section { padding: 14px; }
  header.top h1 { font-size: 1.4rem; }
}
"""


@dataclass
class _Section:
    anchor: str
    heading: str
    body: str


def _table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    headings: Sequence[str] | None = None,
) -> str:
    """A table; numbers right-aligned, rates as percentages with a bar, every cell escaped."""
    rows = [list(row) for row in rows]
    numeric = [
        any(_is_number(row[i]) for row in rows)
        and all(_is_number(row[i]) or row[i] is None for row in rows)
        for i in range(len(columns))
    ]
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if num else f"<th>{_e(h)}</th>"
        for h, num in zip(headings or columns, numeric, strict=True)
    )
    body = []
    for row in rows:
        cells = []
        for column, value in zip(columns, row, strict=True):
            if _is_rate(column, value):
                pct = 100 * float(value)
                cells.append(
                    f'<td class="num">{pct:.1f}%<span class="bar"><span style="width:'
                    f'{pct:.1f}%"></span></span></td>'
                )
            elif _is_number(value):
                cells.append(f'<td class="num">{_e(fmt_value(value))}</td>')
            else:
                cells.append(f"<td>{_e(fmt_value(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _dict_rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    headings = [c[:1].upper() + c[1:].replace("_", " ") for c in columns]
    return _table(columns, ([row.get(c) for c in columns] for row in rows), headings=headings)


def _figure(img_dir: Path, name: str, caption: str, alt: str, *, pixelated: bool = False) -> str:
    path = img_dir / name
    with Image.open(path) as img:
        width, height = img.size
    cls = ' class="pixelated"' if pixelated else ""
    return (
        f'<figure><img src="{img_dir.name}/{name}" alt="{_e(alt)}" width="{width}" '
        f'height="{height}" loading="lazy"{cls}><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _cards(items: Sequence[tuple[str, str, str]]) -> str:
    cards = "".join(
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value">{_e(value)}</div><div class="sub">{_e(sub)}</div></div>'
        for label, value, sub in items
    )
    return f'<div class="cards">{cards}</div>'


# ---------------------------------------------------------------------------------- sections


def _metrics_section(report: ReportData) -> _Section | None:
    if not report.metrics:
        return None
    level = _level(report)
    cards = _cards(
        [
            (
                _metric_name(key),
                fmt_value(float(value)),
                f"{level} CI {fmt_interval(report.intervals.get(key))}"
                if key in report.intervals
                else "",
            )
            for key, value in list(report.metrics.items())[:MAX_METRIC_CARDS]
        ]
    )
    with_intervals = any(key in report.intervals for key in report.metrics)
    rows = []
    for key, value in report.metrics.items():
        name = _metric_name(key)
        key_note = "" if name == key else f' <span class="key">{_e(key)}</span>'
        row = f'<td>{_e(name)}{key_note}</td><td class="num">{_e(fmt_value(float(value)))}</td>'
        if with_intervals:
            row += f'<td class="interval">{_e(fmt_interval(report.intervals.get(key)))}</td>'
        rows.append(f"<tr>{row}</tr>")
    head = '<th>Metric</th><th class="num">Value</th>'
    if with_intervals:
        head += f"<th>{_e(level)} interval</th>"
    table = (
        f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    lead = ""
    if FLOOR_KEY in report.metrics:
        lead = (
            '<p class="lead">The floor is the FID between two halves of the real holdout set: '
            "what a perfect model would score at that sample size. Compare it with FID (half "
            "sample), measured on the same number of images.</p>"
        )
    return _Section("metrics", "Metrics", lead + cards + table)


def _notes_section(report: ReportData) -> _Section | None:
    if not report.notes:
        return None
    items = "".join(f"<li>{_e(note)}</li>" for note in report.notes)
    return _Section("notes", "Notes", f'<ul class="notes">{items}</ul>')


def _samples_section(report: ReportData, img_dir: Path) -> _Section | None:
    samples = report.samples
    if samples is None or len(samples) == 0:
        return None
    h = int(samples.shape[-2])
    scale = max(1, min(4, round(64 / h)))
    conditional = report.labels is not None
    shown = samples if conditional else samples[:MAX_UNCONDITIONAL_SAMPLES]
    plots.plot_sample_grid(
        img_dir / "samples.png",
        shown,
        labels=report.labels,
        class_names=report.class_names,
        per_class=10,
        scale=scale,
    )
    size = f"{samples.shape[-1]}×{samples.shape[-2]}"
    if conditional:
        caption = (
            f"Generated samples ({size} px, shown {scale}× larger): one row per class, "
            f"up to 10 per class, out of {len(samples):,} samples."
        )
    else:
        caption = f"{len(shown):,} of {len(samples):,} generated samples ({size} px)."
    alt = f"Grid of generated samples from {report.model_name}"
    return _Section(
        "samples", "Samples", _figure(img_dir, "samples.png", caption, alt, pixelated=True)
    )


def _figures_section(report: ReportData, img_dir: Path) -> _Section | None:
    """The extra figures, e.g. slices and projections of volumes: 4 per class, or 16."""
    if not report.figures:
        return None
    body = ""
    for name, images, labels, caption in report.figures:
        scale = max(1, min(4, round(64 / int(images.shape[-2]))))
        plots.plot_sample_grid(
            img_dir / name,
            images if labels is not None else images[:16],
            labels=labels,
            class_names=report.class_names,
            per_class=4,
            scale=scale,
        )
        body += _figure(img_dir, name, caption, caption, pixelated=True)
    return _Section("figures", "More views", body)


def _decision_html(promotion: Mapping[str, Any], version: str) -> str:
    """The promotion decision for this run's model ``version``, and the rule's reason."""
    promoted = bool(promotion.get("promoted"))
    previous = promotion.get("previous_champion")
    if previous is not None and str(previous) == version:  # the champion, evaluated again
        verdict = f"v{version} is the champion" + (" (promoted again)" if promoted else "")
    elif promoted:
        verdict = "Promoted to champion" + (f", replacing v{previous}" if previous else "")
    else:
        verdict = "Not promoted" + (f": v{previous} stays champion" if previous else "")
    cls = "decision promoted" if promoted else "decision"
    return (
        f'<div class="{cls}"><div class="verdict">{_e(verdict)}</div>'
        f'<div class="why">{_e(promotion.get("reason", ""))}</div></div>'
    )


def _comparison_section(report: ReportData) -> _Section | None:
    if not report.comparison and not report.promotion:
        return None
    body = _decision_html(report.promotion, report.model_version) if report.promotion else ""
    if report.comparison:
        body += (
            '<p class="lead">A challenger becomes champion only when its metric record matches '
            "the champion's and its whole FID interval lies below the champion's.</p>"
            + _dict_rows_table(report.comparison)
        )
    return _Section("comparison", "Comparison with champion", body)


def _safety_section(report: ReportData) -> _Section | None:
    if not report.safety:
        return None
    scalars: list[tuple[str, Any]] = []
    per_detector: dict[str, dict[str, Any]] = {}
    columns: list[str] = []
    for key, value in report.safety.items():
        if isinstance(value, Mapping):
            for detector, inner in value.items():
                entries = inner.items() if isinstance(inner, Mapping) else [(key, inner)]
                for column, v in entries:
                    per_detector.setdefault(str(detector), {})[str(column)] = v
                    if str(column) not in columns:
                        columns.append(str(column))
        elif isinstance(value, list | tuple):
            scalars.append((key, ", ".join(str(v) for v in value)))
        else:
            scalars.append((key, value))
    body = ""
    numeric = [(k, v) for k, v in scalars if _is_number(v)]
    other = [(k, v) for k, v in scalars if not _is_number(v)]
    if numeric:
        body += _cards([(k.replace("_", " "), fmt_value(v), "") for k, v in numeric])
    if other:
        items = "".join(f"<li><strong>{_e(k)}</strong>: {_e(v)}</li>" for k, v in other)
        body += f'<ul class="notes">{items}</ul>'
    if per_detector:
        body += "<h3>Per detector</h3>" + _table(
            ["detector", *columns],
            ([name, *(row.get(c) for c in columns)] for name, row in per_detector.items()),
            headings=["Detector", *(c.replace("_", " ").capitalize() for c in columns)],
        )
    return _Section("safety", "Safety filter", body)


def _sweep_section(report: ReportData, img_dir: Path) -> _Section | None:
    if not report.sweep:
        return None
    reserved = {"sampler", "nfe", "wall_seconds", "steps"}
    keys = [k for row in report.sweep for k in row]
    metric = "fid" if "fid" in keys else None
    if metric is None:
        metric = next(
            (
                k
                for row in report.sweep
                for k, v in row.items()
                if k not in reserved and _is_number(v) and not k.endswith(("_low", "_high"))
            ),
            None,
        )
    figures = []
    if metric is not None:
        for cost, name in (("nfe", "sweep_nfe.png"), ("wall_seconds", "sweep_wall.png")):
            if cost not in keys:
                continue
            try:
                plots.plot_metric_vs_cost(img_dir / name, report.sweep, metric=metric, cost=cost)
            except ValueError:
                continue
            what = "network evaluations" if cost == "nfe" else "wall-clock seconds"
            band = " Shaded: interval." if f"{metric}_low" in keys else ""
            label = _metric_name(metric)
            caption = f"{label} against {what} (log scale), one line per sampler.{band}"
            alt = f"Line chart of {label} against {what} for each sampler"
            figures.append(_figure(img_dir, name, caption, alt))
    body = "".join(figures)
    body += (
        f"<details><summary>Sweep data ({len(report.sweep)} rows)</summary>"
        f"{_dict_rows_table(report.sweep)}</details>"
    )
    return _Section("sweep", "Quality against cost", body)


def _training_section(report: ReportData, img_dir: Path) -> _Section | None:
    if not report.history:
        return None
    try:
        plots.plot_loss_curve(img_dir / "loss.png", report.history)
    except ValueError:
        return None
    losses = [r["loss"] for r in report.history if _is_number(r.get("loss"))]
    final = f" Last logged loss {fmt_value(float(losses[-1]))}." if losses else ""
    caption = (
        f"Training loss over {len(report.history):,} logged steps: raw values (faint) and an "
        f"exponential moving average (bold).{final}"
    )
    alt = "Line chart of training loss against step"
    return _Section("training", "Training", _figure(img_dir, "loss.png", caption, alt))


def _schedule_section(report: ReportData, img_dir: Path) -> _Section | None:
    if report.schedule_name is None:
        return None
    name, steps = report.schedule_name, int(report.num_steps)
    known = name in BETA_SCHEDULES
    names = list(SCHEDULE_NAMES) + ([name] if known and name not in SCHEDULE_NAMES else [])
    plots.plot_schedules(
        img_dir / "schedules.png", num_steps=steps, names=names, highlight=name if known else None
    )
    body = _figure(
        img_dir,
        "schedules.png",
        f"Noise schedules over {steps:,} steps; this model uses the {name} schedule.",
        "Three line charts of beta, alpha-bar and log-SNR against timestep for each schedule",
    )
    real = report.real_images
    if known and real is not None and len(real) > 0:
        grid = sorted({min(steps - 1, round(f * steps)) for f in PROGRESSION_FRACTIONS})
        plots.plot_noise_progression(
            img_dir / "noise_progression.png",
            real,
            NoiseSchedule.from_name(name, steps),
            steps=grid,
            title=f"Forward process q(x_t | x_0), {name} schedule, {steps} steps",
        )
        body += _figure(
            img_dir,
            "noise_progression.png",
            "Training images noised to increasing timesteps t with the model's schedule; "
            "each row keeps one noise draw.",
            "Grid of training images with more noise added in each column",
            pixelated=True,
        )
    return _Section("schedule", "Noise schedule", body)


_INPAINT_COLUMNS = {
    "mask": "Mask",
    "method": "Method",
    "resample": "Resample r",
    "nfe": "NFE",
    "psnr": "PSNR (dB)",
    "mse": "MSE",
    "seam": "Seam",
    "seam_real": "Seam (real)",
    "seam_ratio": "Seam / real",
    "known_changed": "Known values changed",
    "seconds": "Seconds",
}


def _inpainting_figure(report: ReportData, img_dir: Path) -> str:
    """Per mask kind, rows of masked input, each method's completion and the real image."""
    examples = report.inpainting_examples
    if examples is None or len(examples) == 0:
        return ""
    kinds = list(dict.fromkeys(row["mask"] for row in report.inpainting))
    names = list(dict.fromkeys(row["method"] for row in report.inpainting))
    per_kind = len(names) + 2
    k = len(examples) // (len(kinds) * per_kind)
    scale = max(1, min(4, round(64 / int(examples.shape[-2]))))
    to_pil(make_grid(examples, nrow=k, pad=1, scale=scale)).save(img_dir / "inpainting.png")
    order = ", ".join(["masked input (grey = to fill)", *names, "real image"])
    caption = (
        f"Per mask ({', '.join(kinds)}, top to bottom), {per_kind} rows of {k} holdout images: "
        f"{order}."
    )
    alt = "Grid of masked holdout images, their completions and the real images"
    return _figure(img_dir, "inpainting.png", caption, alt, pixelated=True)


def _inpainting_section(report: ReportData, img_dir: Path) -> _Section | None:
    if not report.inpainting:
        return None
    rows = report.inpainting
    changed = sum(int(row["known_changed"]) for row in rows)
    exact = (
        "The known region of every completion equals the input exactly."
        if changed == 0
        else f"{changed:,} known-region values differ from the input: inpainting is broken."
    )
    count = f"{int(rows[0]['num_images']):,} holdout" if "num_images" in rows[0] else "Holdout"
    lead = (
        f'<p class="lead">{count} images per mask, completed without class labels. '
        "RePaint (Lugmayr et al. 2022) resamples r times every j steps; r = 1 is plain "
        "replacement. PSNR and MSE on "
        "[0, 1] over the filled pixels against the real image; the seam is the mean absolute "
        "step across the mask boundary, beside the same on the real image (ratio 1 = as smooth "
        f"as the real image). {_e(exact)}</p>"
    )
    columns = [c for c in _INPAINT_COLUMNS if any(c in row for row in rows)]
    table = _table(
        columns,
        ([row.get(c) for c in columns] for row in rows),
        headings=[_INPAINT_COLUMNS[c] for c in columns],
    )
    return _Section("inpainting", "Inpainting", lead + table + _inpainting_figure(report, img_dir))


def _config_section(report: ReportData) -> _Section | None:
    if not report.config:
        return None
    plain = json.loads(json.dumps(report.config, default=str))
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=100)
    body = f"<details><summary>Run configuration</summary><pre>{_e(text)}</pre></details>"
    return _Section("config", "Configuration", body)


# ------------------------------------------------------------------------------------- public


def write_report(out_dir: Path, report: ReportData) -> Path:
    """Write ``out_dir/index.html`` and its figures under ``out_dir/img``; return index.html."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # figures of an earlier report in the same folder
        (img_dir / name).unlink(missing_ok=True)
    candidates = [
        _metrics_section(report),
        _notes_section(report),
        _samples_section(report, img_dir),
        _figures_section(report, img_dir),
        _comparison_section(report),
        _safety_section(report),
        _sweep_section(report, img_dir),
        _training_section(report, img_dir),
        _schedule_section(report, img_dir),
        _inpainting_section(report, img_dir),
        _config_section(report),
    ]
    sections = [s for s in candidates if s is not None]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    toc = "".join(f'<a href="#{s.anchor}">{_e(s.heading)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{_e(s.heading)}</h2>{s.body}</section>' for s in sections
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(report.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header class="top"><div class="wrap">
<h1>{_e(report.title)}</h1>
<div class="meta">
<span>Model <strong>{_e(report.model_name)}</strong> <span class="badge">v{_e(report.model_version)}</span></span>
<span>Run <strong><code>{_e(report.run_id)}</code></strong></span>
<span>Generated {_e(generated)}</span>
</div>
<nav class="toc">{toc}</nav>
</div></header>
<main class="wrap">
{body}
</main>
<footer class="wrap">{_e(report.model_name)} v{_e(report.model_version)} · run {_e(report.run_id)}</footer>
</body>
</html>
"""  # noqa: E501
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _md(text: Any) -> str:
    """Escape a string for a markdown table cell or inline text."""
    out = html.escape(str(text), quote=False)
    for ch in "\\`*_|#":
        out = out.replace(ch, "\\" + ch)
    return out.replace("\n", " ")


def report_markdown(report: ReportData, *, report_url: str) -> str:
    """A short summary (metrics, safety counts, link) for a markdown artifact; never indented."""
    lines = [
        f"# {_md(report.title)}",
        "",
        f"**Model** {_md(report.model_name)} v{_md(report.model_version)} · "
        f"**run** {_md(report.run_id)}",
        "",
    ]
    if report.metrics:
        with_intervals = any(key in report.intervals for key in report.metrics)
        level = _level(report)
        if with_intervals:
            lines += [f"| Metric | Value | {level} interval |", "| --- | ---: | --- |"]
        else:
            lines += ["| Metric | Value |", "| --- | ---: |"]
        for key, value in report.metrics.items():
            row = f"| {_md(_metric_name(key))} | {_md(fmt_value(float(value)))} |"
            if with_intervals:
                row += f" {_md(fmt_interval(report.intervals.get(key)))} |"
            lines.append(row)
        lines.append("")
    if report.safety:
        parts = []
        for key, value in report.safety.items():
            if _is_number(value):
                parts.append(f"{_md(key.replace('_', ' '))} {_md(fmt_value(value))}")
            elif isinstance(value, Mapping):
                rates = [
                    f"{_md(det)} {100 * float(v):.1f}%"
                    if _is_rate(key, v)
                    else f"{_md(det)} {_md(fmt_value(v))}"
                    for det, v in value.items()
                    if not isinstance(v, Mapping)
                ]
                if rates:
                    parts.append(f"{_md(key.replace('_', ' '))}: {', '.join(rates)}")
        if parts:
            lines += ["**Safety:** " + " · ".join(parts), ""]
    lines.append(report_link_markdown(report_url))
    return "\n".join(line.lstrip() for line in lines) + "\n"


def report_link_markdown(report_url: str) -> str:
    """Markdown that leads to the report: a link where a browser can open the URL (``file``,
    ``http(s)``); for object storage (``s3://``), the URL and how to fetch the folder, since a
    browser cannot open it and the report's relative image links need the whole folder."""
    scheme = urllib.parse.urlsplit(report_url).scheme
    if scheme in ("file", "http", "https"):
        url = urllib.parse.quote(report_url, safe=":/?#[]@!$&'*+,;=%~")
        return f"[Open the full report]({url})"
    folder = report_url.rsplit("/", 1)[0] + "/"
    return (
        f"Full report: `{report_url}` (object storage: copy the folder, e.g. "
        f"`aws s3 cp --recursive {folder} report/`, and open `report/index.html`)"
    )
