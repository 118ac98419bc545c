"""The pipeline's Prefect artifacts: the report's summary and the metrics of each run, and the
comparison table of a model's versions (keyed by model name, so each is versioned by key)."""

from __future__ import annotations

import re
from typing import Any

from diffpipe.tasks import tracking
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from diffusion_core.pipeline.stages.evaluate import Evaluation
from diffusion_core.pipeline.stages.safety import SafetyRef
from diffusion_core.report.html import report_link_markdown


def artifact_key(name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) for model ``name``."""
    return re.sub(r"[^a-z0-9]+", "-", f"{name}-{suffix}".lower()).strip("-")


def report_artifact_markdown(
    model: tracking.ModelRef,
    evaluation: Evaluation,
    safety: SafetyRef,
    decision: dict[str, Any],
    report_url: str,
    *,
    run_id: str | None = None,
) -> str:
    """The run's markdown artifact: metrics, sample counts, the promotion decision and where the
    report is (a link for local disk; for object storage the URL and how to fetch it)."""
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    lines = [
        f"# {model.name} v{model.version}",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {k} | {v:.4g} |" for k, v in evaluation.metrics.items()),
        "",
        f"Published {safety.published}, quarantined {safety.quarantined}.",
        "",
        f"Promotion: {verdict} ({decision['reason']}).",
        "",
        report_link_markdown(report_url),
    ]
    if run_id:
        lines += ["", f"Also in MLflow: run `{run_id}`, artifacts under `report/`."]
    return "\n".join(lines) + "\n"


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_run(
    model: tracking.ModelRef,
    evaluation: Evaluation,
    safety: SafetyRef,
    decision: dict[str, Any],
    report_url: str,
    *,
    run_id: str | None = None,
) -> None:
    """The run's markdown artifact (the report) and table artifact (the metrics)."""
    create_markdown_artifact(
        markdown=report_artifact_markdown(
            model, evaluation, safety, decision, report_url, run_id=run_id
        ),
        key=artifact_key(model.name, "report"),
        description="Run report",
    )
    create_table_artifact(
        table=[{"metric": k, "value": v} for k, v in evaluation.metrics.items()],
        key=artifact_key(model.name, "metrics"),
        description="Evaluation metrics",
    )


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison(model_name: str, rows: list[dict[str, Any]]) -> None:
    """The comparison table of ``model_name``'s versions."""
    create_table_artifact(table=rows, key=artifact_key(model_name, "comparison"))
