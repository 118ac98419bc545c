"""The report's sections: each builds its HTML (and figures) from :class:`ReportData`, or is
left out when there is nothing to show."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from diffusion_core.io import make_grid, to_pil
from diffusion_core.report import charts, plots
from diffusion_core.report.data import (
    FLOOR_KEY,
    MAX_METRIC_CARDS,
    MAX_UNCONDITIONAL_SAMPLES,
    PROGRESSION_FRACTIONS,
    SCHEDULE_NAMES,
    ReportData,
    escape,
    fmt_interval,
    fmt_value,
    is_number,
    is_rate,
    level_text,
    metric_name,
)
from diffusion_core.schedules import BETA_SCHEDULES, NoiseSchedule


@dataclass
class Section:
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
        any(is_number(row[i]) for row in rows)
        and all(is_number(row[i]) or row[i] is None for row in rows)
        for i in range(len(columns))
    ]
    head = "".join(
        f'<th class="num">{escape(h)}</th>' if num else f"<th>{escape(h)}</th>"
        for h, num in zip(headings or columns, numeric, strict=True)
    )
    body = []
    for row in rows:
        cells = []
        for column, value in zip(columns, row, strict=True):
            if is_rate(column, value):
                pct = 100 * float(value)
                cells.append(
                    f'<td class="num">{pct:.1f}%<span class="bar"><span style="width:'
                    f'{pct:.1f}%"></span></span></td>'
                )
            elif is_number(value):
                cells.append(f'<td class="num">{escape(fmt_value(value))}</td>')
            else:
                cells.append(f"<td>{escape(fmt_value(value))}</td>")
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
        f'<figure><img src="{img_dir.name}/{name}" alt="{escape(alt)}" width="{width}" '
        f'height="{height}" loading="lazy"{cls}><figcaption>{escape(caption)}</figcaption></figure>'
    )


def _cards(items: Sequence[tuple[str, str, str]]) -> str:
    cards = "".join(
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div><div class="sub">{escape(sub)}</div></div>'
        for label, value, sub in items
    )
    return f'<div class="cards">{cards}</div>'


# ---------------------------------------------------------------------------------- sections


def metrics_section(report: ReportData) -> Section | None:
    if not report.metrics:
        return None
    level = level_text(report)
    cards = _cards(
        [
            (
                metric_name(key),
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
        name = metric_name(key)
        key_note = "" if name == key else f' <span class="key">{escape(key)}</span>'
        number = escape(fmt_value(float(value)))
        row = f'<td>{escape(name)}{key_note}</td><td class="num">{number}</td>'
        if with_intervals:
            row += f'<td class="interval">{escape(fmt_interval(report.intervals.get(key)))}</td>'
        rows.append(f"<tr>{row}</tr>")
    head = '<th>Metric</th><th class="num">Value</th>'
    if with_intervals:
        head += f"<th>{escape(level)} interval</th>"
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
    return Section("metrics", "Metrics", lead + cards + table)


def per_class_section(report: ReportData) -> Section | None:
    """FID with its interval, precision and recall of each class against its own references."""
    if not report.per_class:
        return None
    lead = (
        '<p class="lead">Each class\'s samples against the reference images of that class, on '
        "the same features: a class far above the others is one the model has not learned as "
        "well. With few references a class, the intervals are wide.</p>"
    )
    return Section("per-class", "Quality by class", lead + _dict_rows_table(report.per_class))


def notes_section(report: ReportData) -> Section | None:
    if not report.notes:
        return None
    items = "".join(f"<li>{escape(note)}</li>" for note in report.notes)
    return Section("notes", "Notes", f'<ul class="notes">{items}</ul>')


def samples_section(report: ReportData, img_dir: Path) -> Section | None:
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
    return Section(
        "samples", "Samples", _figure(img_dir, "samples.png", caption, alt, pixelated=True)
    )


def figures_section(report: ReportData, img_dir: Path) -> Section | None:
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
    return Section("figures", "More views", body)


def safety_section(report: ReportData) -> Section | None:
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
    numeric = [(k, v) for k, v in scalars if is_number(v)]
    other = [(k, v) for k, v in scalars if not is_number(v)]
    if numeric:
        body += _cards([(k.replace("_", " "), fmt_value(v), "") for k, v in numeric])
    if other:
        items = "".join(f"<li><strong>{escape(k)}</strong>: {escape(v)}</li>" for k, v in other)
        body += f'<ul class="notes">{items}</ul>'
    if per_detector:
        body += "<h3>Per detector</h3>" + _table(
            ["detector", *columns],
            ([name, *(row.get(c) for c in columns)] for name, row in per_detector.items()),
            headings=["Detector", *(c.replace("_", " ").capitalize() for c in columns)],
        )
    return Section("safety", "Safety filter", body)


def sweep_section(report: ReportData, img_dir: Path) -> Section | None:
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
                if k not in reserved and is_number(v) and not k.endswith(("_low", "_high"))
            ),
            None,
        )
    figures = []
    if metric is not None:
        for cost, name in (("nfe", "sweep_nfe.png"), ("wall_seconds", "sweep_wall.png")):
            if cost not in keys:
                continue
            try:
                charts.plot_metric_vs_cost(img_dir / name, report.sweep, metric=metric, cost=cost)
            except ValueError:
                continue
            what = "network evaluations" if cost == "nfe" else "wall-clock seconds"
            band = " Shaded: interval." if f"{metric}_low" in keys else ""
            label = metric_name(metric)
            caption = f"{label} against {what} (log scale), one line per sampler.{band}"
            alt = f"Line chart of {label} against {what} for each sampler"
            figures.append(_figure(img_dir, name, caption, alt))
    body = "".join(figures)
    body += (
        f"<details><summary>Sweep data ({len(report.sweep)} rows)</summary>"
        f"{_dict_rows_table(report.sweep)}</details>"
    )
    return Section("sweep", "Quality against cost", body)


def training_section(report: ReportData, img_dir: Path) -> Section | None:
    if not report.history:
        return None
    try:
        plots.plot_loss_curve(img_dir / "loss.png", report.history)
    except ValueError:
        return None
    losses = [r["loss"] for r in report.history if is_number(r.get("loss"))]
    final = f" Last logged loss {fmt_value(float(losses[-1]))}." if losses else ""
    caption = (
        f"Training loss over {len(report.history):,} logged steps: raw values (faint) and an "
        f"exponential moving average (bold).{final}"
    )
    alt = "Line chart of training loss against step"
    return Section("training", "Training", _figure(img_dir, "loss.png", caption, alt))


def schedule_section(report: ReportData, img_dir: Path) -> Section | None:
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
    return Section("schedule", "Noise schedule", body)


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


def inpainting_section(report: ReportData, img_dir: Path) -> Section | None:
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
        f"as the real image). {escape(exact)}</p>"
    )
    columns = [c for c in _INPAINT_COLUMNS if any(c in row for row in rows)]
    table = _table(
        columns,
        ([row.get(c) for c in columns] for row in rows),
        headings=[_INPAINT_COLUMNS[c] for c in columns],
    )
    return Section("inpainting", "Inpainting", lead + table + _inpainting_figure(report, img_dir))


def config_section(report: ReportData) -> Section | None:
    if not report.config:
        return None
    plain = json.loads(json.dumps(report.config, default=str))
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=100)
    body = f"<details><summary>Run configuration</summary><pre>{escape(text)}</pre></details>"
    return Section("config", "Configuration", body)
