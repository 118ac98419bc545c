"""The flows: nightly training and evaluation of registered models, read like the recipe.

nightly:  prepare_dataset -> train -> register -> (evaluate chain)
evaluate: (evaluate chain) for a registered version, e.g. when registration emits its event
evaluate chain: sample (sharded, mapped) -> safety_filter -> [watermark] -> evaluate
                -> [inpaint_evaluate] -> [sweep] -> compare/promote -> report

Both flows share one run lifecycle (:class:`RunLifecycle`): an MLflow run is started, each step
is timed, and the run ends FINISHED, or FAILED with the error raised as ``RunFailed`` naming the
step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffpipe.flows.configs import resolve_config
from diffpipe.flows.lifecycle import (
    RunLifecycle,
    Target,
    emit_registered,
    emit_rejected,
    model_lock,
)
from diffpipe.flows.runners import one_gpu_each, task_runner
from diffpipe.tasks import artifacts, comparison, registry, steps, tracking
from prefect import flow, get_run_logger, unmapped
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from diffusion_core.config import (
    SAMPLING_KNOBS,
    EvaluationConfig,
    RunConfig,
    RuntimeConfig,
    diffpipe_home,
)
from diffusion_core.evaluation.promotion import reevaluable
from diffusion_core.model import ModelCard
from diffusion_core.pipeline.layout import RunLayout
from diffusion_core.pipeline.stages.dataset import DatasetRef, check_fits
from diffusion_core.pipeline.stages.evaluate import Evaluation
from diffusion_core.pipeline.stages.inpaint import InpaintEvaluation
from diffusion_core.pipeline.stages.report import ReportInputs
from diffusion_core.pipeline.stages.safety import SafetyRef
from diffusion_core.pipeline.stages.sample import ShardRef
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.sampling import SampleRequest


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


@dataclass(frozen=True)
class Subject:
    """What the evaluate chain evaluates: a registered version, its checkpoint and data."""

    model: tracking.ModelRef
    checkpoint_prefix: str
    dataset: DatasetRef
    card: ModelCard
    history: list[dict[str, float]]


@flow(name="sample", log_prints=True)
def sample_all(
    artefact_root: str,
    checkpoint_prefix: str,
    request: SampleRequest,
    out_prefix: str,
    shards: int,
    runtime: RuntimeConfig,
) -> list[ShardRef]:
    """The run's samples in ``shards`` mapped tasks, on the runner ``runtime.task_runner``
    names (a nested flow, so that the bulk work can run on a Dask cluster); each shard is
    written by its worker straight to the store."""
    size = -(-request.count() // shards)
    with one_gpu_each(runtime.task_runner):
        futures = steps.sample_shard.map(
            artefact_root,
            checkpoint_prefix,
            unmapped(request),
            out_prefix,
            shard=list(range(shards)),
            shard_size=size,
            runtime=unmapped(runtime),
        )
    return [f.result() for f in futures]


@dataclass(frozen=True)
class Judged:
    """A checkpoint's samples, drawn, filtered, marked and evaluated."""

    shards: list[ShardRef]
    safety: SafetyRef
    mark: Any  # WatermarkRef when the watermark is on
    evaluation: Evaluation


def judge(
    cfg: RunConfig,
    run: RunLifecycle,
    checkpoint_prefix: str,
    data: DatasetRef,
    request: SampleRequest,
    layout: RunLayout,
    model: tuple[str, str],
    step: str = "",
) -> Judged:
    """Sample ``checkpoint_prefix`` (sharded, on the task runner), filter, watermark with
    ``model`` (name, version) and evaluate: the steps named ``<step>sample`` ... ."""
    root, pc = run.target.artefact_root, cfg.pipeline
    with run.step(f"{step}sample"):
        runner = task_runner(cfg.runtime.task_runner)
        shards = sample_all.with_options(task_runner=runner)(
            root, checkpoint_prefix, request, layout.samples, pc.shards, cfg.runtime
        )
    with run.step(f"{step}safety_filter"):
        safety = steps.safety_filter(root, shards, data, layout.safety, cfg.safety, cfg.runtime)
    mark = None
    if pc.watermark.enabled:  # only the published images, before anything reads them
        with run.step(f"{step}watermark"):
            mark = steps.watermark_published(
                root, safety, *model, run.run_id, layout.published, pc.watermark
            )
        safety = mark.safety  # evaluation and the report read the marked images
    with run.step(f"{step}evaluate"):
        evaluation = steps.evaluate_samples(
            root, safety, data, shards, request.seed, layout.metrics, cfg.evaluation, cfg.runtime
        )
    return Judged(shards, safety, mark, evaluation)


def evaluate_chain(cfg: RunConfig, run: RunLifecycle, subject: Subject) -> dict[str, Any]:
    """Sample, filter, evaluate, compare and report one registered version with ``cfg``'s
    sample, safety, evaluation and pipeline sections (the model's own card for the rest)."""
    # Long function: the evaluation recipe, one step per block, read top to bottom.
    root, uri, pc, layout = (
        run.target.artefact_root,
        run.target.tracking_uri,
        cfg.pipeline,
        run.layout,
    )
    model, data = subject.model, subject.dataset
    request = SampleRequest.from_config(cfg.sample, num_samples=pc.num_samples)
    mine = judge(
        cfg, run, subject.checkpoint_prefix, data, request, layout, (model.name, model.version)
    )
    shards, safety, mark, evaluation = mine.shards, mine.safety, mine.mark, mine.evaluation
    inpainting = None
    if pc.inpainting.enabled:
        with run.step("inpaint_evaluate"):
            inpainting = steps.evaluate_inpainting(
                root,
                subject.checkpoint_prefix,
                data,
                request,
                pc.inpainting,
                layout.inpainting,
                cfg.runtime,
            )
    sweep = None
    if cfg.evaluation.sweep:
        with run.step("sweep"):
            sweep = steps.sweep_samplers(
                root,
                subject.checkpoint_prefix,
                data,
                request,
                cfg.evaluation,
                layout.sweep,
                cfg.runtime,
            )
            if sweep.match is not None:  # the cheapest match becomes the version's default
                registry.set_sampling(uri, model, sweep_default(subject.card, request, sweep.match))
    # The champion, drawn with this version's knobs and seeds (and evaluated again on new data).
    current = registry.champion(uri, model.name)
    rival = None if current is None or current.version == model.version else current
    same_terms = request.model_copy(update=shards[0].knobs.model_dump())
    champion_evaluation, side_by_side = None, None
    if rival is not None:
        with run.step("champion_checkpoint"):
            rival_prefix = registry.checkpoint_in_store(uri, model.name, rival.version, root)
        if cfg.promotion.reevaluate_champion and reevaluable(asdict(evaluation), rival):
            champion_evaluation = judge(
                cfg, run, rival_prefix, data, same_terms, layout.champion,
                (model.name, rival.version), step="champion_",
            ).evaluation  # fmt: skip
        with run.step("side_by_side"):
            side_by_side = steps.side_by_side(
                root, subject.checkpoint_prefix, rival_prefix, same_terms, layout.champion.root
            )
    with run.step("compare"):
        decision = registry.compare_promote(
            uri, model, evaluation, cfg.promotion, champion_evaluation
        )
        run.promoted, run.champion_before = decision["promoted"], decision["previous_champion"]
        comparison = registry.comparison_rows(uri, model.name)
    if not decision["promoted"] and rival is not None:
        emit_rejected(model, run.target, decision)
    with run.step("report"):
        report_url = steps.make_report(
            root,
            ReportInputs(
                out_prefix=layout.report,
                run_id=run.run_id,
                model_name=model.name,
                model_version=model.version,
                config=cfg.to_dict(),
                diffusion=subject.card.diffusion,
                dataset=data,
                safety=safety,
                metrics=evaluation.metrics,
                history=subject.history,
                comparison=comparison,
                promotion=decision,
                inpainting_prefix=None if inpainting is None else inpainting.prefix,
                notes=[sweep.note] if sweep else [],
                sweep=sweep.rows if sweep else [],
                side_by_side=side_by_side,
                champion_version=None if rival is None else rival.version,
            ),
        )
    with run.step("log"):
        log_evaluation(run, model, evaluation, safety, inpainting, decision, report_url)
        if champion_evaluation is not None:
            registry.log_metrics(
                uri,
                run.run_id,
                {f"champion/{k}": v for k, v in champion_evaluation.metrics.items()},
            )
        aliases = registry.version_aliases(uri, model.name, model.version)
    return {
        "model": {"name": model.name, "version": model.version, "aliases": aliases},
        "metrics": evaluation.metrics,
        "record": evaluation.record,
        "report_uri": report_url,
        "samples": {"published": safety.published, "quarantined": safety.quarantined},
        "sample_workers": sorted({s.worker for s in shards}),
        "devices": {
            "sample": shards[0].device,
            "safety_filter": safety.device,
            "evaluate": evaluation.record["device"],
        },
        "promotion": decision,
        "champion_evaluation": None if champion_evaluation is None else champion_evaluation.metrics,
        "inpainting": [] if inpainting is None else inpainting.rows,
        **({"watermark": mark.summary()} if mark is not None else {}),
        **({"sweep": sweep_summary(root, sweep)} if sweep else {}),
    }


def sweep_default(card: ModelCard, request: SampleRequest, match: dict[str, Any]) -> Any:
    """The sampling a sweep's cheapest match stands for: the request's knobs (the card's where
    it sets none) with the match's sampler and steps."""
    return request.knobs(card).model_copy(
        update={k: match[k] for k in SAMPLING_KNOBS if match.get(k) is not None}
    )


def log_evaluation(
    run: RunLifecycle,
    model: tracking.ModelRef,
    evaluation: Evaluation,
    safety: SafetyRef,
    inpainting: InpaintEvaluation | None,
    decision: dict[str, Any],
    report_url: str,
) -> None:
    """The evaluation's metrics and report in MLflow, and the run's Prefect artifacts."""
    uri, run_id = run.target.tracking_uri, run.run_id
    counts = {"samples/published": safety.published, "samples/quarantined": safety.quarantined}
    rates = {f"safety/flag_rate/{k}": v for k, v in safety.flag_rates.items()}
    extra = inpainting.metrics if inpainting is not None else {}
    registry.log_metrics(uri, run_id, {**evaluation.metrics, **extra, **counts, **rates})
    registry.log_report(uri, run_id, run.target.artefact_root, run.layout.report)
    artifacts.publish_run(model, evaluation, safety, decision, report_url, run_id=run_id)


def sweep_summary(root: str, sweep: Any) -> dict[str, Any]:
    return {
        "rows": sweep.rows,
        "note": sweep.note,
        "match": sweep.match,
        "table_uri": ArtefactStore(root).url(sweep.prefix, "sweep.csv"),
    }


@flow(name="nightly", log_prints=True)
def nightly(
    config: RunConfig | str = "quickstart",
    overrides: dict[str, Any] | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Prepare data, train, register, then (unless ``evaluate`` is off, e.g. when a triggered
    evaluation deployment does it) sample, filter, evaluate, compare and report. ``config`` is a
    parsed config, a config file or the name of a packaged config (``quickstart``)."""
    cfg = resolve_config(config, overrides)
    name = cfg.pipeline.model_name or cfg.name
    with model_lock(name, cfg.pipeline.lock_wait_seconds):
        summary = _nightly(cfg, name, evaluate)
    get_run_logger().info("report: %s", summary.get("report_uri", "(not evaluated)"))
    return summary


def _nightly(cfg: RunConfig, name: str, evaluate: bool) -> dict[str, Any]:
    target = Target.for_config(cfg)
    params, tags = (
        cfg.to_dict(),
        {
            "diffpipe.flow": "nightly",
            "diffpipe.config_hash": cfg.hash(),
            "diffpipe.code_version": tracking.code_version(),
        },
    )
    run_name = f"nightly-{time.strftime('%Y%m%d-%H%M%S')}"
    with RunLifecycle.start(
        target, experiment=f"diffpipe-{cfg.name}", run_name=run_name, params=params, tags=tags
    ) as run:
        root, uri = target.artefact_root, target.tracking_uri
        with run.step("prepare_dataset"):
            data, cached = steps.prepare_dataset_cached(cfg.data, root)
            check_fits(cfg, data.class_names)  # before any training
            registry.log_metrics(uri, run.run_id, {"dataset/skipped": data.skipped})
        parent = None
        if cfg.train.init_from != "none":
            with run.step("warm_start"):
                parent = registry.warm_start(uri, cfg.train.init_from, name, root)
        with run.step("train"):
            ckpt = steps.train_model(
                cfg, data, root, run.layout.checkpoint, target.work_dir, parent
            )
            registry.log_history(uri, run.run_id, ckpt.history)
        with run.step("register"):
            lineage = {tracking.PARENT_TAG: parent.model_uri} if parent else {}
            model = registry.register(
                ckpt,
                root,
                uri,
                run.run_id,
                name,
                tags={
                    "dataset_sha256": data.sha256,
                    "config_hash": cfg.hash(),
                    "code_version": tracking.code_version(),
                    "checkpoint_url": ckpt.url,
                    "diffpipe.checkpoint_prefix": ckpt.prefix,
                    "diffpipe.artefact_root": root,
                    "diffpipe.dataset": data.to_json(),
                    **lineage,
                },
            )
            run.registered = model  # taken back if the run fails from here on
            card = registry.read_card(root, ckpt.prefix)
        emit_registered(model, target, run.run_id, evaluates=evaluate)
        summary: dict[str, Any] = {
            "run_id": run.run_id,
            "model": {"name": model.name, "version": model.version, "aliases": model.aliases},
            "checkpoint_url": ckpt.url,
            "training": {"steps": ckpt.steps, "steps_run": ckpt.steps_run},
            "parent": parent.model_uri if parent else None,
            "devices": {"train": ckpt.device, "train_processes": ckpt.processes},
            "dataset": {
                "url": data.url,
                "sha256": data.sha256,
                "cached": cached,
                "skipped": data.skipped,
            },
        }
        if evaluate:
            subject = Subject(model, ckpt.prefix, data, card, ckpt.history)
            chain = evaluate_chain(cfg, run, subject)
            summary |= chain | {"devices": summary["devices"] | chain["devices"]}
        summary |= run.timings()
    return summary


@flow(name="evaluate", log_prints=True)
def evaluate_model(
    model_uri: str,
    tracking_uri: str | None = None,
    config: RunConfig | str | None = None,
    evaluation: EvaluationConfig | None = None,
) -> dict[str, Any]:
    """Sample, filter, evaluate, compare and report a registered version ``models:/<name>/<v>``
    (or ``@alias``) with the sample, safety, evaluation and pipeline sections of ``config``
    (default: the defaults, with the model card's own sampling); ``evaluation`` replaces the
    config's ``evaluation:`` section (e.g. a sweep). The training run's settings are never used."""
    uri = tracking.tracking_uri(tracking_uri)
    version = registry.resolve_model(uri, model_uri)
    cfg = resolve_config(config, None) if config is not None else RunConfig()
    if evaluation is not None:
        cfg = cfg.model_copy(update={"evaluation": evaluation})
    root = version.tags["diffpipe.artefact_root"]
    target = Target(root, uri, str(diffpipe_home() / "work"))
    checkpoint_prefix = version.tags["diffpipe.checkpoint_prefix"]
    model = tracking.ModelRef(version.name, version.version, version.aliases, model_uri)
    tags = {"diffpipe.flow": "evaluate", "diffpipe.model": f"{version.name}/{version.version}"}
    with RunLifecycle.start(
        target,
        experiment=f"diffpipe-{version.name}",
        evaluation=True,
        tags=tags,
        run_name=f"evaluate-{version.name}-v{version.version}",
        params=cfg.to_dict(),
    ) as run:
        with run.step("load"):
            card = registry.read_card(root, checkpoint_prefix)
            data = DatasetRef.from_json(version.tags["diffpipe.dataset"], dims=card.dims)
            check_fits(cfg, data.class_names, training=False)
            history = registry.training_history(uri, version.run_id)
        subject = Subject(model, checkpoint_prefix, data, card, history)
        summary = {"run_id": run.run_id} | evaluate_chain(cfg, run, subject)
        summary |= run.timings()
    return summary


@flow(name="compare", log_prints=True)
def compare_models(model_name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The comparison table of every registered version of ``model_name``."""
    table = comparison.comparison_table(tracking.tracking_uri(tracking_uri), model_name)
    rows: list[dict[str, Any]] = json.loads(table.to_json(orient="records", date_format="iso"))
    if rows:
        artifacts.publish_comparison(model_name, rows)
    return rows


def write_summary(summary: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2, default=str))
