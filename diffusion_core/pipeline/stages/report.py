"""The report stage: render the run's HTML report from what the other stages committed."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_core.config import DiffusionConfig
from diffusion_core.evaluation.quality import CLASS_METRICS, class_rows
from diffusion_core.pipeline.modality import modality
from diffusion_core.pipeline.stages.dataset import DatasetRef, read_split
from diffusion_core.pipeline.stages.inpaint import read_inpainting
from diffusion_core.pipeline.stages.safety import SafetyRef, read_published
from diffusion_core.pipeline.stages.sample import SIDE_BY_SIDE_FILE, read_tensors
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.report.html import ReportData, write_report


@dataclass(frozen=True)
class ReportInputs:
    out_prefix: str
    run_id: str
    model_name: str
    model_version: str
    config: dict[str, Any]  # what the report shows as the run's configuration
    diffusion: DiffusionConfig  # the model's noise schedule, for the schedule figures
    dataset: DatasetRef
    safety: SafetyRef
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inpainting_prefix: str | None = None  # an evaluate_inpainting output, when it ran
    promotion: dict[str, Any] = field(default_factory=dict)  # promoted, reason, previous_champion
    sweep: list[dict[str, Any]] = field(default_factory=list)
    side_by_side: str | None = None  # a sample.side_by_side output: challenger and champion
    champion_version: str | None = None


def _safety_summary(safety: SafetyRef) -> dict[str, Any]:
    failed = {"failed_detectors": sorted(safety.failures)} if safety.failures else {}
    return {
        "published": safety.published,
        "quarantined": safety.quarantined,
        "flag_rates": safety.flag_rates,
        "flag_counts": safety.flag_counts,
        **failed,
    }


def skip_note(dataset: DatasetRef) -> list[str]:
    """The report's line on what loading the data left out (none when nothing was)."""
    if not dataset.skipped:
        return []
    return [
        f"Data: {dataset.skipped} item(s) of the source were left out when the dataset was "
        "built (unreadable files, captions rows naming no image of the folder); the log of the "
        "run that built it names them."
    ]


def make_report(store: ArtefactStore, inputs: ReportInputs) -> str:
    """Render the HTML report of a run and commit it under ``inputs.out_prefix``; returns the
    URL of its ``index.html``."""
    published = read_published(store, inputs.safety.prefix)
    holdout = read_split(store, inputs.dataset, "holdout")
    kind = modality(inputs.dataset.dims)
    labels = published.get("labels")
    intervals = {
        name: (inputs.metrics[f"{name}_low"], inputs.metrics[f"{name}_high"])
        for name in ("fid", "kid")
        if f"{name}_low" in inputs.metrics
    }
    data = ReportData(
        title=f"{inputs.model_name} v{inputs.model_version}",
        run_id=inputs.run_id,
        model_name=inputs.model_name,
        model_version=inputs.model_version,
        config=inputs.config,
        metrics={
            k: v
            for k, v in inputs.metrics.items()
            if not k.endswith(("_low", "_high")) and not k.startswith(CLASS_METRICS)
        },
        per_class=class_rows(inputs.metrics, inputs.dataset.class_names),
        intervals=intervals,
        history=inputs.history,
        samples=kind.report_samples(published["images"]),
        labels=labels,
        class_names=inputs.dataset.class_names,
        real_images=kind.report_real(holdout),
        figures=kind.report_figures(published["images"], labels, holdout),
        schedule_name=inputs.diffusion.schedule,
        num_steps=inputs.diffusion.num_steps,
        safety=_safety_summary(inputs.safety),
        comparison=inputs.comparison,
        sweep=inputs.sweep,
        notes=[*inputs.notes, *skip_note(inputs.dataset)],
        promotion=inputs.promotion,
    )
    if inputs.inpainting_prefix is not None:
        data.inpainting, data.inpainting_examples = read_inpainting(store, inputs.inpainting_prefix)
    if inputs.side_by_side is not None:
        pair = read_tensors(store, inputs.side_by_side, SIDE_BY_SIDE_FILE)
        data.side_by_side = (
            kind.report_samples(pair["challenger"]),
            kind.report_samples(pair["champion"]),
            pair.get("labels"),
        )
        data.champion_version = inputs.champion_version
    with tempfile.TemporaryDirectory() as tmp:
        write_report(Path(tmp), data)
        store.put_dir(inputs.out_prefix, tmp)
    return store.url(inputs.out_prefix, "index.html")
