"""A self-contained HTML report of one run, and a short markdown summary that links to it.

:func:`write_report` writes ``index.html`` and ``img/*.png`` into one folder: relative links only,
inline styles, no scripts, fonts or stylesheets from elsewhere, so the folder can be copied to
object storage or opened from disk as it is. Every string that comes from a config, a dataset or
a user is HTML-escaped.
"""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from diffusion_core.report import comparison, sections
from diffusion_core.report.data import (
    FIGURE_FILES,
    PROGRESSION_FRACTIONS,
    ReportData,
    escape,
    fmt_interval,
    fmt_value,
    is_number,
    is_rate,
    level_text,
    metric_name,
)

__all__ = ["PROGRESSION_FRACTIONS", "ReportData", "report_markdown", "write_report"]

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


# ------------------------------------------------------------------------------------- public


def write_report(out_dir: Path, report: ReportData) -> Path:
    """Write ``out_dir/index.html`` and its figures under ``out_dir/img``; return index.html."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # figures of an earlier report in the same folder
        (img_dir / name).unlink(missing_ok=True)
    candidates = [
        sections.metrics_section(report),
        sections.per_class_section(report),
        sections.notes_section(report),
        sections.samples_section(report, img_dir),
        sections.figures_section(report, img_dir),
        comparison.comparison_section(report),
        comparison.champion_section(report, img_dir),
        sections.safety_section(report),
        sections.sweep_section(report, img_dir),
        sections.training_section(report, img_dir),
        sections.schedule_section(report, img_dir),
        sections.inpainting_section(report, img_dir),
        sections.config_section(report),
    ]
    shown = [s for s in candidates if s is not None]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    toc = "".join(f'<a href="#{s.anchor}">{escape(s.heading)}</a>' for s in shown)
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{escape(s.heading)}</h2>{s.body}</section>' for s in shown
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(report.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header class="top"><div class="wrap">
<h1>{escape(report.title)}</h1>
<div class="meta">
<span>Model <strong>{escape(report.model_name)}</strong> <span class="badge">v{escape(report.model_version)}</span></span>
<span>Run <strong><code>{escape(report.run_id)}</code></strong></span>
<span>Generated {escape(generated)}</span>
</div>
<nav class="toc">{toc}</nav>
</div></header>
<main class="wrap">
{body}
</main>
<footer class="wrap">{escape(report.model_name)} v{escape(report.model_version)} · run {escape(report.run_id)}</footer>
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
        level = level_text(report)
        if with_intervals:
            lines += [f"| Metric | Value | {level} interval |", "| --- | ---: | --- |"]
        else:
            lines += ["| Metric | Value |", "| --- | ---: |"]
        for key, value in report.metrics.items():
            row = f"| {_md(metric_name(key))} | {_md(fmt_value(float(value)))} |"
            if with_intervals:
                row += f" {_md(fmt_interval(report.intervals.get(key)))} |"
            lines.append(row)
        lines.append("")
    if report.safety:
        parts = []
        for key, value in report.safety.items():
            if is_number(value):
                parts.append(f"{_md(key.replace('_', ' '))} {_md(fmt_value(value))}")
            elif isinstance(value, Mapping):
                rates = [
                    f"{_md(det)} {100 * float(v):.1f}%"
                    if is_rate(key, v)
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
