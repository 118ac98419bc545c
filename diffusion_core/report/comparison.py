"""The report's comparison sections: the promotion decision with every rule's verdict and the
table of versions, and the challenger beside the champion (same seeds) with each metric across
the last versions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion_core.report import charts
from diffusion_core.report.data import ReportData, escape, fmt_value, metric_name
from diffusion_core.report.sections import Section, _dict_rows_table, _figure, _table


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
        f'<div class="{cls}"><div class="verdict">{escape(verdict)}</div>'
        f'<div class="why">{escape(promotion.get("reason", ""))}</div></div>'
    )


def _rules_table(promotion: Mapping[str, Any]) -> str:
    """Every promotion rule's verdict: the metric, both values, the allowed change, the result."""
    rules = promotion.get("rules") or []
    if not rules:
        return ""
    rows = [
        (
            metric_name(r["rule"]),
            "—" if r["challenger"] is None else fmt_value(r["challenger"]),
            "—" if r["champion"] is None else fmt_value(r["champion"]),
            r["limit"],
            "not measured" if r["passed"] is None else ("passed" if r["passed"] else "FAILED"),
        )
        for r in rules
    ]
    columns = ("rule", "challenger", "champion", "allowed", "verdict")
    return _table(columns, rows, headings=[c.capitalize() for c in columns])


def comparison_section(report: ReportData) -> Section | None:
    if not report.comparison and not report.promotion:
        return None
    body = _decision_html(report.promotion, report.model_version) if report.promotion else ""
    if report.promotion.get("champion_reevaluated"):
        body += (
            '<p class="lead">The data changed since the champion was evaluated: it was evaluated '
            "again on this run's reference, judge, sampler settings and seeds, and the decision "
            "was taken on those numbers.</p>"
        )
    body += _rules_table(report.promotion)
    if report.comparison:
        body += (
            '<p class="lead">A challenger becomes champion only when its metric record matches '
            "the champion's, its whole FID interval lies below the champion's, and no guarded "
            "metric is worse beyond its tolerance.</p>" + _dict_rows_table(report.comparison)
        )
    return Section("comparison", "Comparison with champion", body)


TREND_METRICS = (
    ("FID", "FID"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("cond. accuracy", "Conditional accuracy"),
    ("quarantined", "Quarantined share"),
)


def champion_section(report: ReportData, img_dir: Path) -> Section | None:
    """The challenger and the champion drawn with the same seeds and labels, side by side, and
    each metric across the last versions."""
    body = ""
    if report.side_by_side is not None:
        mine, theirs, _labels = report.side_by_side
        scale = max(1, min(4, round(48 / int(mine.shape[-2]))))
        charts.plot_side_by_side(
            img_dir / "side_by_side.png",
            mine,
            theirs,
            titles=(
                f"challenger v{report.model_version}",
                f"champion v{report.champion_version}",
            ),
            scale=scale,
        )
        caption = (
            f"{len(mine)} samples of each, drawn with the same seeds, labels and sampler "
            "settings: image i on the left and image i on the right started from the same noise."
        )
        body += _figure(img_dir, "side_by_side.png", caption, caption, pixelated=True)
    versions = [r for r in report.comparison if r.get("version") is not None]
    if len(versions) >= 2:
        highlight = [v for v in (report.model_version, report.champion_version) if v]
        try:
            charts.plot_metric_trend(
                img_dir / "metric_trend.png", versions, TREND_METRICS, highlight=highlight
            )
        except ValueError:  # no metric recorded on any version yet
            pass
        else:
            caption = (
                "Each metric across the last registered versions (circled: this version and "
                "the champion it was compared with)."
            )
            body += _figure(img_dir, "metric_trend.png", caption, caption)
    if not body:
        return None
    return Section("champion", "Champion and challenger", body)
