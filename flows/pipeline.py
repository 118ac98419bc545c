"""The flows: nightly training and evaluation of registered models, read like the recipe.

nightly:  prepare_dataset -> train -> register -> (evaluate chain)
evaluate: (evaluate chain) for a registered version, e.g. when registration emits its event
evaluate chain: sample (sharded, mapped) -> safety_filter -> evaluate -> compare/promote -> report
                (with pipeline.inpainting.enabled, inpaint_evaluate runs after evaluate)
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.logging.handlers import APILogHandler

from diffusion_core import stages
from diffusion_core.config import RunConfig, load_config, parse_config
from diffusion_core.report import report_link_markdown
from diffusion_core.storage import ArtefactStore, default_root, diffpipe_home
from tasks import steps, tracking

REGISTERED_EVENT = "diffpipe.model.registered"


class _InRun(logging.Filter):
    """Only records made inside a flow or task run go to the API (the library is also used
    outside flows, where there is no run to attach them to)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _ship_library_logs() -> None:
    """Send diffusion_core's log records to the Prefect run logs (what the setting
    PREFECT_LOGGING_EXTRA_LOGGERS does, independent of when prefect was first imported)."""
    logger = logging.getLogger("diffusion_core")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(_InRun())
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


_ship_library_logs()


@dataclass
class StepClock:
    """Wall seconds per step, as the flow saw them."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)


@dataclass(frozen=True)
class Target:
    """Where a run keeps things."""

    artefact_root: str
    tracking_uri: str
    work_dir: str

    @classmethod
    def for_config(cls, cfg: RunConfig) -> Target:
        home = diffpipe_home()
        return cls(
            artefact_root=ArtefactStore(cfg.pipeline.artefact_root or default_root()).root,
            tracking_uri=tracking.tracking_uri(cfg.pipeline.tracking_uri),
            work_dir=str(home / "work"),
        )


def emit_registered(model: tracking.ModelRef, target: Target, run_id: str) -> None:
    """Tell automations a version was registered (payload: name, version, model_uri)."""
    emit_event(
        event=REGISTERED_EVENT,
        resource={
            "prefect.resource.id": f"diffpipe.model.{model.name}.{model.version}",
            "prefect.resource.name": model.name,
        },
        payload={
            "name": model.name,
            "version": model.version,
            "model_uri": model.uri,
            "artefact_root": target.artefact_root,
            "tracking_uri": target.tracking_uri,
            "run_id": run_id,
        },
    )


def evaluate_chain(
    cfg: RunConfig,
    target: Target,
    *,
    run_id: str,
    run_prefix: str,
    model: tracking.ModelRef,
    checkpoint_prefix: str,
    dataset: stages.DatasetRef,
    history: list[dict[str, float]],
    clock: StepClock,
) -> dict[str, Any]:
    """Sample, filter, evaluate, compare and report one registered version."""
    root, pc = target.artefact_root, cfg.pipeline
    shard_size = -(-pc.num_samples // pc.shards)
    with clock.step("sample"):
        futures = steps.sample.map(
            root, checkpoint_prefix, unmapped(cfg.sample.model_dump(mode="json")),
            f"{run_prefix}/samples", shard=list(range(pc.shards)), shard_size=shard_size,
            total=pc.num_samples,
        )  # fmt: skip
        shards = [f.result() for f in futures]
    with clock.step("safety_filter"):
        safety = steps.safety_filter(
            root, shards, dataset, f"{run_prefix}/safety", cfg.safety.model_dump(mode="json")
        )
    mark = None
    if pc.watermark.enabled:  # only the published images, before anything reads them
        with clock.step("watermark"):
            mark = steps.watermark(root, safety, model, run_id, f"{run_prefix}/published",
                                   pc.watermark.model_dump(mode="json"))  # fmt: skip
        safety = mark.safety  # evaluation and the report read the marked images
    with clock.step("evaluate"):
        evaluation = steps.evaluate(
            root, safety, dataset, cfg.sample.model_dump(mode="json"), f"{run_prefix}/metrics.json",
            cfg.evaluation.model_dump(mode="json"),
        )  # fmt: skip
    inpainting = None
    if pc.inpainting.enabled:
        with clock.step("inpaint_evaluate"):
            inpainting = steps.inpaint_evaluate(
                root, checkpoint_prefix, dataset, cfg.sample.model_dump(mode="json"),
                pc.inpainting.model_dump(mode="json"), f"{run_prefix}/inpainting",
            )  # fmt: skip
    sweep = None
    if cfg.evaluation.sweep:
        with clock.step("sweep"):
            sweep = steps.sweep(
                root, checkpoint_prefix, dataset, cfg.to_dict(), f"{run_prefix}/sweep"
            )
    with clock.step("compare"):
        decision = steps.compare_promote(target.tracking_uri, model, evaluation)
    comparison = tracking.report_rows(tracking.comparison_table(target.tracking_uri, model.name))
    with clock.step("report"):
        report_url = steps.report(
            root,
            stages.ReportInputs(
                run_prefix=run_prefix, run_id=run_id, model_name=model.name,
                model_version=model.version, config=cfg.to_dict(), dataset=dataset,
                safety=safety, metrics=evaluation.metrics, history=history,
                comparison=comparison, promotion=decision,
                inpainting_prefix=None if inpainting is None else inpainting.prefix,
                notes=[sweep.note] if sweep else [],
                sweep=sweep.rows if sweep else [],
            ),
        )  # fmt: skip
    tracking.log_metrics(target.tracking_uri, run_id, evaluation.metrics)
    tracking.log_metrics(
        target.tracking_uri, run_id,
        {"samples/published": safety.published, "samples/quarantined": safety.quarantined,
         **{f"safety/flag_rate/{k}": v for k, v in safety.flag_rates.items()}},
    )  # fmt: skip
    if inpainting is not None:
        tracking.log_metrics(target.tracking_uri, run_id, inpainting.metrics)
    tracking.log_report(target.tracking_uri, run_id, ArtefactStore(root), f"{run_prefix}/report")
    publish_artifacts(model, evaluation, safety, decision, report_url, run_id=run_id)
    aliases = tracking.version_aliases(target.tracking_uri, model.name, model.version)
    return {
        "model": {"name": model.name, "version": model.version, "aliases": aliases},
        "metrics": evaluation.metrics,
        "record": evaluation.record,
        "report_uri": report_url,
        "samples": {"published": safety.published, "quarantined": safety.quarantined},
        "promotion": decision,
        "inpainting": [] if inpainting is None else inpainting.rows,
        **({"watermark": mark.summary()} if mark is not None else {}),
        **({"sweep": sweep_summary(root, sweep)} if sweep else {}),
    }


def sweep_summary(root: str, sweep: stages.SweepRef) -> dict[str, Any]:
    return {
        "rows": sweep.rows,
        "note": sweep.note,
        "match": sweep.match,
        "table_uri": ArtefactStore(root).url(sweep.prefix, "sweep.csv"),
    }


def artifact_key(name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) for model ``name``."""
    return re.sub(r"[^a-z0-9]+", "-", f"{name}-{suffix}".lower()).strip("-")


def report_artifact_markdown(
    model: tracking.ModelRef,
    evaluation: stages.Evaluation,
    safety: stages.SafetyRef,
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


def publish_artifacts(
    model: tracking.ModelRef,
    evaluation: stages.Evaluation,
    safety: stages.SafetyRef,
    decision: dict[str, Any],
    report_url: str,
    *,
    run_id: str | None = None,
) -> None:
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


@flow(name="nightly", log_prints=True)
def nightly(
    config_path: str = "configs/quickstart.yaml",
    overrides: dict[str, Any] | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Prepare data, train, register, then (unless ``evaluate`` is off, e.g. when a triggered
    evaluation deployment does it) sample, filter, evaluate, compare and report."""
    t0 = time.perf_counter()
    cfg = load_config(config_path, overrides)
    target = Target.for_config(cfg)
    name = cfg.pipeline.model_name or cfg.name
    clock = StepClock()
    run_id = tracking.start_run(
        target.tracking_uri, f"diffpipe-{cfg.name}", target.artefact_root,
        run_name=f"nightly-{time.strftime('%Y%m%d-%H%M%S')}", params=cfg.to_dict(),
        tags={"diffpipe.flow": "nightly", "diffpipe.config_hash": cfg.hash(),
              "diffpipe.code_version": tracking.code_version()},
    )  # fmt: skip
    run_prefix = f"runs/{run_id}"
    try:
        with clock.step("prepare_dataset"):
            dataset = steps.prepare_dataset_cached(
                cfg.data.model_dump(mode="json"), target.artefact_root
            )
        with clock.step("train"):
            ckpt = steps.train(
                cfg.to_dict(), dataset, target.artefact_root, run_prefix, target.work_dir
            )
        tracking.log_history(target.tracking_uri, run_id, ckpt.history)
        with clock.step("register"):
            model = steps.register(
                ckpt, target.artefact_root, target.tracking_uri, run_id, name,
                tags={"dataset_sha256": dataset.sha256, "config_hash": cfg.hash(),
                      "code_version": tracking.code_version(), "checkpoint_url": ckpt.url,
                      "diffpipe.checkpoint_prefix": ckpt.prefix,
                      "diffpipe.artefact_root": target.artefact_root,
                      "diffpipe.dataset": json.dumps(asdict(dataset))},
            )  # fmt: skip
        emit_registered(model, target, run_id)
        summary: dict[str, Any] = {
            "run_id": run_id,
            "model": {"name": model.name, "version": model.version, "aliases": model.aliases},
            "checkpoint_url": ckpt.url,
            "training": {"steps": ckpt.steps, "steps_run": ckpt.steps_run},
            "dataset": {"url": dataset.url, "sha256": dataset.sha256},
        }
        if evaluate:
            summary |= evaluate_chain(
                cfg, target, run_id=run_id, run_prefix=run_prefix, model=model,
                checkpoint_prefix=ckpt.prefix, dataset=dataset, history=ckpt.history, clock=clock,
            )  # fmt: skip
    except BaseException:
        tracking.end_run(target.tracking_uri, run_id, "FAILED")
        raise
    summary["step_seconds"] = clock.seconds
    summary["wall_seconds"] = round(time.perf_counter() - t0, 3)
    tracking.log_metrics(
        target.tracking_uri, run_id, {f"seconds/{k}": v for k, v in clock.seconds.items()}
    )
    tracking.end_run(target.tracking_uri, run_id, "FINISHED")
    get_run_logger().info("report: %s", summary.get("report_uri", "(not evaluated)"))
    return summary


@flow(name="evaluate", log_prints=True)
def evaluate_model(
    model_uri: str, tracking_uri: str | None = None, evaluation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sample, filter, evaluate, compare and report a registered version ``models:/<name>/<v>``;
    ``evaluation`` (an ``evaluation:`` config section, e.g. with a ``sweep``) replaces the one
    saved with the checkpoint."""
    t0 = time.perf_counter()
    uri = tracking.tracking_uri(tracking_uri)
    version = tracking.resolve_version(uri, model_uri)
    root = version.tags["diffpipe.artefact_root"]
    dataset = stages.DatasetRef(**json.loads(version.tags["diffpipe.dataset"]))
    checkpoint_prefix = version.tags["diffpipe.checkpoint_prefix"]
    cfg = stages.checkpoint_config(ArtefactStore(root), checkpoint_prefix)
    if evaluation is not None:
        cfg = parse_config({**cfg.to_dict(), "evaluation": evaluation}, source="evaluation")
    target = Target(root, uri, str(diffpipe_home() / "work"))
    model = tracking.ModelRef(version.name, str(version.version), list(version.aliases), model_uri)
    clock = StepClock()
    run_id = tracking.start_run(
        uri, f"diffpipe-{cfg.name}", root,
        run_name=f"evaluate-{version.name}-v{version.version}", params=cfg.to_dict(),
        tags={"diffpipe.flow": "evaluate", "diffpipe.model": f"{version.name}/{version.version}"},
    )  # fmt: skip
    try:
        summary = {"run_id": run_id} | evaluate_chain(
            cfg, target, run_id=run_id, run_prefix=f"evaluations/{run_id}", model=model,
            checkpoint_prefix=checkpoint_prefix, dataset=dataset,
            history=tracking.training_history(uri, version.run_id), clock=clock,
        )  # fmt: skip
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    summary["step_seconds"] = clock.seconds
    summary["wall_seconds"] = round(time.perf_counter() - t0, 3)
    tracking.end_run(uri, run_id, "FINISHED")
    return summary


@flow(name="compare", log_prints=True)
def compare_models(model_name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The comparison table of every registered version of ``model_name``."""
    table = tracking.comparison_table(tracking.tracking_uri(tracking_uri), model_name)
    rows: list[dict[str, Any]] = json.loads(table.to_json(orient="records", date_format="iso"))
    if rows:
        create_table_artifact(table=rows, key=artifact_key(model_name, "comparison"))
    return rows


def write_summary(summary: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2, default=str))
