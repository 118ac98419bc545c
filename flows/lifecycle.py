"""What every flow run shares: where it keeps things (:class:`Target`), its MLflow run with timed
steps (:class:`RunLifecycle`), the one-run-per-model lock, and the events it emits for
automations (a version registered, a challenger rejected).

A run starts by cleaning up after runs that were killed (:func:`clean_up_after_kills`), and a run
that fails after registering a version takes it back (no ``challenger`` left pointing at a
failed run)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffpipe.tasks import recovery, registry, tracking
from prefect.context import FlowRunContext
from prefect.events import emit_event

from diffusion_core.config import RunConfig, diffpipe_home
from diffusion_core.pipeline.cleanup import remove_run_staging, remove_stale_staging
from diffusion_core.pipeline.errors import RunFailed
from diffusion_core.pipeline.layout import RunLayout
from diffusion_core.pipeline.lock import hold
from diffusion_core.pipeline.store import ArtefactStore, default_root

log = logging.getLogger(__name__)

REGISTERED_EVENT = "diffpipe.model.registered"
REJECTED_EVENT = "diffpipe.model.rejected"


@dataclass(frozen=True)
class Target:
    """Where a run keeps things."""

    artefact_root: str
    tracking_uri: str
    work_dir: str

    @classmethod
    def for_config(cls, cfg: RunConfig) -> Target:
        return cls(
            artefact_root=ArtefactStore(cfg.pipeline.artefact_root or default_root()).root,
            tracking_uri=tracking.tracking_uri(cfg.pipeline.tracking_uri),
            work_dir=str(diffpipe_home() / "work"),
        )


def clean_up_after_kills(target: Target, experiment: str, flow: str) -> None:
    """What killed runs left: runs of ``flow`` in ``experiment`` still RUNNING with their process
    gone are marked KILLED and the staging under their prefixes removed; the staging of
    checkpoints in training directories no live run holds is removed."""
    store = ArtefactStore(target.artefact_root)
    for run_id in registry.close_stale_runs(target.tracking_uri, experiment, flow):
        remove_run_staging(store, run_id)
    remove_stale_staging(Path(target.work_dir))


@dataclass
class RunLifecycle:
    """One MLflow run for one flow run: steps are timed, the run ends FINISHED when the block
    completes and FAILED when it raises (re-raised as RunFailed naming the step). A version the
    run registered (``registered``) is taken back when it fails, and the champion alias given
    back when the run had moved it (``promoted``, from ``champion_before``)."""

    target: Target
    run_id: str
    layout: RunLayout
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    registered: tracking.ModelRef | None = None
    promoted: bool = False
    champion_before: str | None = None

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        target: Target,
        *,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        evaluation: bool = False,
    ) -> Iterator[RunLifecycle]:
        clean_up_after_kills(target, experiment, tags["diffpipe.flow"])
        tags = {**tags, **recovery.process_tags()}
        run_id = registry.start_run(
            target.tracking_uri, experiment, target.artefact_root, run_name, params, tags
        )
        layout = RunLayout.evaluation(run_id) if evaluation else RunLayout.pipeline_run(run_id)
        run = cls(target, run_id, layout)
        try:
            yield run
        except BaseException as exc:
            run.retract(exc)
            registry.end_run(target.tracking_uri, run_id, "FAILED")
            raise
        seconds = {f"seconds/{k}": v for k, v in run.seconds.items()}
        registry.log_metrics(target.tracking_uri, run_id, seconds)
        registry.end_run(target.tracking_uri, run_id, "FINISHED")

    def retract(self, exc: BaseException) -> None:
        """Take back the version this run registered, after ``exc`` failed the run (a failure
        to do so is logged: the run's own error is the one to report)."""
        if self.registered is None:
            return
        reason = f"run {self.run_id} failed: {exc}"
        try:
            registry.retract(
                self.target.tracking_uri,
                self.registered,
                reason,
                self.promoted,
                self.champion_before,
            )
        except Exception as failure:
            log.warning("could not take back %s: %s", self.registered.uri, failure)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except RunFailed:
            raise
        except Exception as exc:
            raise RunFailed(name, exc) from exc
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)

    def timings(self) -> dict[str, Any]:
        return {
            "step_seconds": dict(self.seconds),
            "wall_seconds": round(time.perf_counter() - self.started, 3),
        }


def emit_registered(
    model: tracking.ModelRef, target: Target, run_id: str, *, evaluates: bool
) -> None:
    """Tell automations a version was registered (payload: name, version, model_uri). The
    resource label ``diffpipe.evaluation`` says who evaluates it: ``in-flow`` when this flow
    goes on to evaluate it, ``requested`` when it does not; the evaluate deployment's trigger
    matches only ``requested``, so no version is evaluated twice."""
    emit_event(
        event=REGISTERED_EVENT,
        resource={
            "prefect.resource.id": f"diffpipe.model.{model.name}.{model.version}",
            "prefect.resource.name": model.name,
            "diffpipe.evaluation": "in-flow" if evaluates else "requested",
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


def emit_rejected(model: tracking.ModelRef, target: Target, decision: dict[str, Any]) -> None:
    """Tell automations a challenger was not promoted over the champion, and why (the reason
    and every rule's verdict): ``deployments/automations.yaml`` reacts to it."""
    emit_event(
        event=REJECTED_EVENT,
        resource={
            "prefect.resource.id": f"diffpipe.model.{model.name}.{model.version}",
            "prefect.resource.name": model.name,
        },
        payload={
            "name": model.name,
            "version": model.version,
            "model_uri": model.uri,
            "champion": decision["previous_champion"],
            "reason": decision["reason"],
            "failed_rules": [r["rule"] for r in decision.get("rules", []) if r["passed"] is False],
            "tracking_uri": target.tracking_uri,
        },
    )


@contextlib.contextmanager
def model_lock(name: str, wait: float) -> Iterator[None]:
    """One nightly run of model ``name`` at a time on this DIFFPIPE_HOME (LockHeld names the
    run that holds it, after ``wait`` seconds)."""
    home = diffpipe_home()
    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    owner = {
        "run": flow_run.name if flow_run else None,
        "flow_run_id": str(flow_run.id) if flow_run else None,
    }
    lock = home / "locks" / f"{name}.lock"
    with hold(lock, what=f"model {name!r} on {home}", owner=owner, wait=wait):
        yield
