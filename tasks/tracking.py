"""MLflow glue: tracking URI, one run per pipeline run, registration and aliases.

Tracking defaults to ``sqlite:///$DIFFPIPE_HOME/mlflow.db`` (``MLFLOW_TRACKING_URI`` or the
config's ``tracking.uri`` win). Each experiment keeps its artifacts under the artefact store's
root (``<root>/mlflow``), so with an ``s3://`` root nothing lands on local disk.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from diffusion_core.storage import ArtefactStore, diffpipe_home

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
CHALLENGER, CHAMPION = "challenger", "champion"


def tracking_uri(configured: str | None = None) -> str:
    return (
        configured
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{diffpipe_home() / 'mlflow.db'}"
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
    from diffusion_core import __version__

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
    checkpoint_dir: Path,
    tags: dict[str, str],
) -> ModelRef:
    """Log the pyfunc (from code) with the checkpoint's EMA weights and config, register it as a
    new version of ``name`` and give that version the alias ``challenger``."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={
                "weights": str(checkpoint_dir / "ema.safetensors"),
                "config": str(checkpoint_dir / "config.json"),
            },
            pip_requirements=["diffpipe", "torch==2.14.1", "safetensors"],
        )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    c = client(uri)
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


def champion(uri: str, name: str) -> tuple[str, dict[str, Any] | None] | None:
    """The champion's version and evaluation, or None when there is no champion."""
    try:
        version = client(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(version.version), get_evaluation(uri, name, str(version.version))


def set_champion(uri: str, name: str, version: str) -> None:
    client(uri).set_registered_model_alias(name, CHAMPION, version)


def comparison_table(uri: str, name: str) -> pd.DataFrame:
    """Every registered version of ``name`` with its aliases, run metrics and metric record."""
    c = client(uri)
    versions = c.search_model_versions(f"name = '{name}'")
    # Search results leave aliases out; the registered model maps alias -> version.
    aliases: dict[str, list[str]] = {}
    if versions:
        for alias, version in c.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions:
        evaluation = json.loads(v.tags.get(EVALUATION_TAG, "null")) or {}
        rows.append(
            {
                "version": int(v.version),
                "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                "run_id": v.run_id,
                "created": pd.Timestamp(v.creation_timestamp, unit="ms"),
                **{f"metrics.{k}": val for k, val in evaluation.get("metrics", {}).items()},
                **{f"record.{k}": val for k, val in evaluation.get("record", {}).items()},
            }
        )
    if not rows:
        return pd.DataFrame(columns=["version", "aliases", "run_id", "created"])
    return pd.DataFrame(rows).sort_values("version").reset_index(drop=True)


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


def download_model_files(uri: str, model_uri: str, dst: str | Path) -> tuple[Path, Path]:
    """The ``config.json`` and EMA weights of a registered version (``models:/<name>/<version>``
    or ``models:/<name>@<alias>``), downloaded under ``dst``."""
    version = resolve_version(uri, model_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(dst)
        )
    )
    config, weights = local / "artifacts" / "config.json", local / "artifacts" / "ema.safetensors"
    if not (config.is_file() and weights.is_file()):
        raise ValueError(f"{model_uri}: not a diffpipe model (no artifacts/config.json, weights)")
    return config, weights


def training_history(uri: str, run_id: str) -> list[dict[str, float]]:
    """The training curve logged by ``log_history``, back as records."""
    c = client(uri)
    losses = c.get_metric_history(run_id, "train/loss")
    return [{"step": float(m.step), "loss": m.value} for m in sorted(losses, key=lambda m: m.step)]
