"""MLflow glue: tracking URI, one run per pipeline run, registration and aliases.

Tracking defaults to ``sqlite:///$DIFFPIPE_HOME/mlflow.db`` (``MLFLOW_TRACKING_URI`` or the
config's ``tracking.uri`` win). Each experiment keeps its artifacts under the artefact store's
root (``<root>/mlflow``), so with an ``s3://`` root nothing lands on local disk. Every call goes
through an ``MlflowClient`` for its URI: MLflow's process-wide URIs are never set here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from diffpipe.tasks import packaging
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from diffusion_core import __version__
from diffusion_core.config import diffpipe_home
from diffusion_core.evaluation.promotion import Champion
from diffusion_core.model import CARD_FILE, LEGACY_CONFIG_FILE, ModelCard
from diffusion_core.pipeline.stages.train import Parent
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.settings import settings

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
CHALLENGER, CHAMPION = "challenger", "champion"


def tracking_uri(configured: str | None = None) -> str:
    return (
        configured or settings().mlflow_tracking_uri or f"sqlite:///{diffpipe_home() / 'mlflow.db'}"
    )


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str, artefact_root: str) -> str:
    """The experiment ``name``, created with its artifacts under the artefact store."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = ArtefactStore(artefact_root).url("mlflow")
    try:
        return str(c.create_experiment(name, artifact_location=location))
    except MlflowException:  # created concurrently
        exp = c.get_experiment_by_name(name)
        assert exp is not None
        return str(exp.experiment_id)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params: ``{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}``."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = str(v)
    return out


def code_version() -> str:
    """The git commit of the code, or the package version outside a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if sha.returncode == 0:
            return sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def start_run(
    uri: str,
    experiment: str,
    artefact_root: str,
    *,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
) -> str:
    c = client(uri)
    run = c.create_run(experiment_id(uri, experiment, artefact_root), run_name=run_name, tags=tags)
    c.log_dict(run.info.run_id, params, "config.json")
    items = list(flatten(params).items())
    for i in range(0, len(items), 100):
        c.log_batch(
            run.info.run_id,
            params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[i : i + 100]],
        )
    return str(run.info.run_id)


def log_metrics(
    uri: str, run_id: str, metrics: dict[str, float], *, step: int | None = None
) -> None:
    now = int(time.time() * 1000)
    batch = [
        mlflow.entities.Metric(k, float(v), now, step or 0)
        for k, v in metrics.items()
        if isinstance(v, int | float)
    ]
    for i in range(0, len(batch), 500):
        client(uri).log_batch(run_id, metrics=batch[i : i + 500])


def log_history(uri: str, run_id: str, history: list[dict[str, float]]) -> None:
    """The training curve as step-indexed metrics (loss, lr, img/s)."""
    now = int(time.time() * 1000)
    batch = [
        mlflow.entities.Metric(f"train/{k}", float(v), now, int(h["step"]))
        for h in history
        for k, v in h.items()
        if k != "step"
    ]
    for i in range(0, len(batch), 900):
        client(uri).log_batch(run_id, metrics=batch[i : i + 900])


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status=status)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    aliases: list[str]
    uri: str


def register_model(
    uri: str,
    run_id: str,
    *,
    name: str,
    checkpoint_dir: str | Path,
    tags: dict[str, str],
) -> ModelRef:
    """Log the pyfunc (from code) with the checkpoint's EMA weights and model card as the run's
    logged model (saved locally, then uploaded by the client: ``mlflow.pyfunc.log_model`` needs
    the global tracking URI), register it as a new version of ``name``, alias ``challenger``.
    The model carries its code and public requirements (``packaging``): it installs anywhere."""
    checkpoint_dir = Path(checkpoint_dir)
    card = ModelCard.read(checkpoint_dir / CARD_FILE)
    c = client(uri)
    logged = c.create_logged_model(
        c.get_run(run_id).info.experiment_id, name="model", source_run_id=run_id
    )
    with temp_dir() as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(local),
            python_model=str(MODEL_CODE),
            artifacts={
                "weights": str(checkpoint_dir / "ema.safetensors"),
                "card": str(checkpoint_dir / CARD_FILE),
            },
            code_paths=packaging.code_paths(),
            pip_requirements=packaging.pip_requirements(card),
            signature=packaging.signature(),
            input_example=packaging.input_example(card),
            model_config=packaging.MODEL_CONFIG,
            mlflow_model=Model(
                artifact_path=logged.artifact_location,
                run_id=run_id,
                model_id=logged.model_id,
                model_uuid=logged.model_id,
            ),
        )
        c.log_model_artifacts(logged.model_id, str(local))
    c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The logged model's location, not models:/<id>: MLflow resolves that with the global URI.
    version = c.create_model_version(
        name, logged.artifact_location, run_id, tags=tags, model_id=logged.model_id
    )
    c.set_registered_model_alias(name, CHALLENGER, version.version)
    return ModelRef(name, str(version.version), [CHALLENGER], f"models:/{name}/{version.version}")


def version_aliases(uri: str, name: str, version: str) -> list[str]:
    return list(client(uri).get_model_version(name, version).aliases)


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="diffpipe-")


EVALUATION_TAG = "diffpipe.evaluation"


def set_evaluation(uri: str, model: ModelRef, evaluation: dict[str, Any]) -> None:
    """Keep a version's metrics and metric record on the version itself (a JSON tag)."""
    client(uri).set_model_version_tag(
        model.name, model.version, EVALUATION_TAG, json.dumps(evaluation, sort_keys=True)
    )


def get_evaluation(uri: str, name: str, version: str) -> dict[str, Any] | None:
    tags = client(uri).get_model_version(name, version).tags
    return json.loads(tags[EVALUATION_TAG]) if EVALUATION_TAG in tags else None


def champion(uri: str, name: str) -> Champion | None:
    """The champion's version and evaluation, or None when there is no champion."""
    try:
        version = client(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return Champion(str(version.version), get_evaluation(uri, name, str(version.version)))


def set_champion(uri: str, name: str, version: str) -> None:
    client(uri).set_registered_model_alias(name, CHAMPION, version)


def log_report(uri: str, run_id: str, store: ArtefactStore, prefix: str) -> None:
    """Copy the committed report folder into the run's MLflow artifacts under ``report/``."""
    with tempfile.TemporaryDirectory(prefix="diffpipe-report-") as tmp:
        store.get_dir(prefix, tmp)
        client(uri).log_artifacts(run_id, tmp, artifact_path="report")


def resolve_version(uri: str, model_uri: str) -> Any:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` to its ModelVersion."""
    if not model_uri.startswith("models:/"):
        raise ValueError(
            f"expected models:/<name>/<version> or models:/<name>@<alias>, got {model_uri!r}"
        )
    rest = model_uri.removeprefix("models:/")
    c = client(uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        name, _, version = rest.partition("/")
        return c.get_model_version(name, version)
    except MlflowException as exc:
        raise ValueError(f"{model_uri}: no such registered model version ({exc.message})") from None


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered version and what the pipeline tagged it with."""

    name: str
    version: str
    aliases: list[str]
    run_id: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_version(uri: str, model_uri: str) -> RegisteredVersion:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` as a RegisteredVersion."""
    v = resolve_version(uri, model_uri)
    return RegisteredVersion(v.name, str(v.version), list(v.aliases), str(v.run_id), dict(v.tags))


def download_model_files(uri: str, model_uri: str, dst: str | Path) -> tuple[Path, Path]:
    """The model card and EMA weights of a registered version (``models:/<name>/<version>``
    or ``models:/<name>@<alias>``), downloaded under ``dst``."""
    version = resolve_version(uri, model_uri)
    source = client(uri).get_model_version_download_uri(version.name, version.version)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=uri, registry_uri=uri
        )
    )
    weights = local / "artifacts" / "ema.safetensors"
    cards = [local / "artifacts" / n for n in (CARD_FILE, LEGACY_CONFIG_FILE)]
    card = next((c for c in cards if c.is_file()), None)
    if card is None or not weights.is_file():
        raise ValueError(f"{model_uri}: not a diffpipe model (no artifacts/{CARD_FILE}, weights)")
    return card, weights


def training_history(uri: str, run_id: str) -> list[dict[str, float]]:
    """The training curve logged by ``log_history``, back as records."""
    c = client(uri)
    losses = c.get_metric_history(run_id, "train/loss")
    return [{"step": float(m.step), "loss": m.value} for m in sorted(losses, key=lambda m: m.step)]


# ----------------------------------------------------------------------------------------------
# The nightly loop: warm starts, champions evaluated again, decisions kept on the version.

PARENT_TAG = "diffpipe.parent"
DECISION_TAG = "diffpipe.decision"
PREVIOUS_EVALUATION_TAG = "diffpipe.evaluation.previous"
SAMPLING_TAG = "diffpipe.sampling"


def set_sampling(uri: str, model: ModelRef, sampling: dict[str, Any]) -> None:
    """The version's default sampling (``diffpipe sample --model`` and ``load_registered`` use
    it instead of the card's)."""
    client(uri).set_model_version_tag(
        model.name, model.version, SAMPLING_TAG, json.dumps(sampling, sort_keys=True)
    )


def get_sampling(tags: dict[str, str]) -> dict[str, Any] | None:
    return json.loads(tags[SAMPLING_TAG]) if SAMPLING_TAG in tags else None


def load_registered(
    model_uri: str, uri: str | None = None, **model_config: Any
) -> mlflow.pyfunc.PyFuncModel:
    """``mlflow.pyfunc.load_model`` of a registered version (``models:/name/3`` or
    ``models:/name@champion``) with the version's default sampling (``diffpipe.sampling``, set
    by a sweep) in its ``model_config``; ``model_config`` adds to it (device, max_samples).
    ``uri`` is the tracking URI (default: ``tracking_uri()``)."""
    uri = uri or tracking_uri()
    v = resolve_version(uri, model_uri)
    sampling = get_sampling(dict(v.tags))
    config = ({"sampling": sampling} if sampling else {}) | model_config
    source = client(uri).get_model_version_download_uri(v.name, v.version)
    return mlflow.pyfunc.load_model(source, model_config=config or None)


def checkpoint_in_store(uri: str, name: str, version: str, artefact_root: str) -> Parent:
    """The checkpoint of ``name`` version ``version`` as a ``Parent`` in ``artefact_root``: its
    own prefix when it lives there, else a copy under ``parents/<sha256>``."""
    v = registered_version(uri, f"models:/{name}/{version}")
    root, prefix = v.tags.get("diffpipe.artefact_root"), v.tags.get("diffpipe.checkpoint_prefix")
    if not root or not prefix:
        raise ValueError(f"{v.uri}: not registered by diffpipe (no checkpoint tags)")
    source, here = ArtefactStore(root), ArtefactStore(artefact_root)
    sha = source.read_manifest(prefix)["files"]["ema.safetensors"]["sha256"]
    if source.root != here.root:
        copy = f"parents/{sha[:16]}"
        if not here.exists_dir(copy):
            with temp_dir() as tmp:
                source.get_dir(prefix, tmp)
                here.put_dir(copy, tmp)
        prefix = copy
    return Parent(v.uri, prefix, sha)


def warm_start_parent(
    uri: str, init_from: str, model_name: str, artefact_root: str
) -> Parent | None:
    """``train.init_from`` resolved: ``champion`` is ``models:/<model_name>@champion`` (None
    while there is none: the night trains from scratch); ``models:/...`` must exist."""
    model_uri = f"models:/{model_name}@{CHAMPION}" if init_from == "champion" else init_from
    try:
        v = registered_version(uri, model_uri)
    except ValueError:
        if init_from == "champion":
            log.info(
                "train.init_from: champion, but %s has none yet: training from scratch", model_name
            )
            return None
        raise ValueError(f"train.init_from: {init_from}: no such registered version") from None
    return checkpoint_in_store(uri, v.name, v.version, artefact_root)


def replace_evaluation(uri: str, name: str, version: str, evaluation: dict[str, Any]) -> None:
    """Give a version a new evaluation (its champion re-evaluated on new data), keeping the one
    it had as ``diffpipe.evaluation.previous``."""
    c = client(uri)
    tags = c.get_model_version(name, version).tags
    if EVALUATION_TAG in tags:
        c.set_model_version_tag(name, version, PREVIOUS_EVALUATION_TAG, tags[EVALUATION_TAG])
    c.set_model_version_tag(name, version, EVALUATION_TAG, json.dumps(evaluation, sort_keys=True))


def set_decision(uri: str, model: ModelRef, decision: dict[str, Any]) -> None:
    """Keep the promotion decision (reason, every rule's verdict) on the version."""
    client(uri).set_model_version_tag(
        model.name, model.version, DECISION_TAG, json.dumps(decision, sort_keys=True)
    )


def get_decision(tags: dict[str, str]) -> dict[str, Any] | None:
    return json.loads(tags[DECISION_TAG]) if DECISION_TAG in tags else None
