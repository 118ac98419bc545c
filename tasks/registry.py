"""The pipeline's MLflow tasks: one run per pipeline run (start, metrics, end), registration,
promotion and the comparison table. Each is a Prefect task, so tracking I/O gets a task-run record
and retries on transient failures like the stages' storage I/O."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from diffpipe.tasks import comparison, recovery, tracking
from diffpipe.tasks.steps import io_retries
from prefect import task
from prefect.cache_policies import NO_CACHE

from diffusion_core.config import PromotionConfig
from diffusion_core.evaluation.promotion import Champion, decide
from diffusion_core.model import CARD_FILE, ModelCard
from diffusion_core.pipeline.stages.evaluate import Evaluation
from diffusion_core.pipeline.stages.train import CheckpointRef, Parent
from diffusion_core.pipeline.store import ArtefactStore

tracked: dict[str, Any] = {"cache_policy": NO_CACHE, **io_retries}


@task(name="start-run", **tracked)
def start_run(
    uri: str,
    experiment: str,
    artefact_root: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
) -> str:
    return tracking.start_run(
        uri, experiment, artefact_root, run_name=run_name, params=params, tags=tags
    )


@task(name="close-stale-runs", **tracked)
def close_stale_runs(uri: str, experiment: str, flow: str) -> list[str]:
    """Runs of ``flow`` left RUNNING by a process that is gone, marked KILLED; their ids."""
    return recovery.close_stale_runs(uri, experiment, flow)


@task(name="retract", task_run_name="retract-{model.name}-v{model.version}", **tracked)
def retract(
    uri: str, model: tracking.ModelRef, reason: str, promoted: bool, champion_before: str | None
) -> None:
    """Take back a version whose run failed after registering it (``recovery.retract``)."""
    recovery.retract(uri, model, reason, promoted=promoted, champion_before=champion_before)


@task(name="end-run", task_run_name="end-run-{status}", **tracked)
def end_run(uri: str, run_id: str, status: str) -> None:
    tracking.end_run(uri, run_id, status)


@task(name="log-metrics", **tracked)
def log_metrics(uri: str, run_id: str, metrics: dict[str, float]) -> None:
    tracking.log_metrics(uri, run_id, metrics)


@task(name="log-history", **tracked)
def log_history(uri: str, run_id: str, history: list[dict[str, float]]) -> None:
    tracking.log_history(uri, run_id, history)


@task(name="log-report", **tracked)
def log_report(uri: str, run_id: str, artefact_root: str, prefix: str) -> None:
    tracking.log_report(uri, run_id, ArtefactStore(artefact_root), prefix)


@task(name="register", task_run_name="register-{model_name}", **tracked)
def register(
    checkpoint: CheckpointRef,
    artefact_root: str,
    uri: str,
    run_id: str,
    model_name: str,
    tags: dict[str, str],
) -> tracking.ModelRef:
    with tracking.temp_dir() as tmp:
        ArtefactStore(artefact_root).get_dir(checkpoint.prefix, tmp)
        return tracking.register_model(uri, run_id, name=model_name, checkpoint_dir=tmp, tags=tags)


@task(name="resolve-model", **tracked)
def resolve_model(uri: str, model_uri: str) -> tracking.RegisteredVersion:
    return tracking.registered_version(uri, model_uri)


@task(name="read-card", **tracked)
def read_card(artefact_root: str, checkpoint_prefix: str) -> ModelCard:
    """The model card of a checkpoint committed in the store."""
    store = ArtefactStore(artefact_root)
    return ModelCard.from_dict(
        json.loads(store.get_bytes(f"{checkpoint_prefix}/{CARD_FILE}")),
        source=store.url(checkpoint_prefix, CARD_FILE),
    )


@task(name="training-history", **tracked)
def training_history(uri: str, run_id: str) -> list[dict[str, float]]:
    return tracking.training_history(uri, run_id)


@task(name="champion", task_run_name="champion-{name}", **tracked)
def champion(uri: str, name: str) -> Champion | None:
    """The current champion of ``name`` and its evaluation (None: there is none)."""
    return tracking.champion(uri, name)


@task(name="warm-start", task_run_name="warm-start-{model_name}", **tracked)
def warm_start(uri: str, init_from: str, model_name: str, artefact_root: str) -> Parent | None:
    """The version ``train.init_from`` names, as a checkpoint in ``artefact_root`` to start
    from (None: ``champion`` while there is none)."""
    return tracking.warm_start_parent(uri, init_from, model_name, artefact_root)


@task(name="champion-checkpoint", **tracked)
def checkpoint_in_store(uri: str, name: str, version: str, artefact_root: str) -> str:
    """The checkpoint prefix of ``name`` version ``version`` in ``artefact_root`` (copied there
    when it lives in another store)."""
    return tracking.checkpoint_in_store(uri, name, version, artefact_root).prefix


@task(name="set-sampling", task_run_name="set-sampling-{model.name}-v{model.version}", **tracked)
def set_sampling(uri: str, model: tracking.ModelRef, sampling: Any) -> None:
    """Make ``sampling`` (the sweep's cheapest match) the version's default sampling."""
    tracking.set_sampling(uri, model, sampling.model_dump(mode="json"))


@task(name="compare-promote", task_run_name="compare-{model.name}-v{model.version}", **tracked)
def compare_promote(
    uri: str,
    model: tracking.ModelRef,
    evaluation: Evaluation,
    rules: PromotionConfig,
    champion_evaluation: Evaluation | None = None,
) -> dict[str, Any]:
    """Record the evaluation on the version; promote it to champion when it wins under
    ``rules``. ``champion_evaluation`` is the champion evaluated again on this evaluation's terms
    (new data): it replaces the champion's recorded one (kept as its previous evaluation), and
    the decision is taken on it."""
    current = tracking.champion(uri, model.name)
    tracking.set_evaluation(uri, model, asdict(evaluation))
    if current is not None and champion_evaluation is not None:
        tracking.replace_evaluation(uri, model.name, current.version, asdict(champion_evaluation))
        current = Champion(current.version, asdict(champion_evaluation))
    decision = decide(asdict(evaluation), current, rules)
    if decision.promote:
        tracking.set_champion(uri, model.name, model.version)
    out = {
        "promoted": decision.promote,
        "reason": decision.reason,
        "previous_champion": None if current is None else current.version,
        "champion_reevaluated": champion_evaluation is not None,
        "rules": decision.rules(),
    }
    tracking.set_decision(uri, model, out)
    return out


@task(name="comparison", task_run_name="comparison-{name}", **tracked)
def comparison_rows(uri: str, name: str) -> list[dict[str, Any]]:
    """The report's comparison table of ``name``'s versions."""
    return comparison.report_rows(comparison.comparison_table(uri, name))


@task(name="version-aliases", **tracked)
def version_aliases(uri: str, name: str, version: str) -> list[str]:
    return tracking.version_aliases(uri, name, version)
