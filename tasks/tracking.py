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
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from diffusion_core import __version__
from diffusion_core.config import diffpipe_home
from diffusion_core.evaluation.promotion import Champion, decide
from diffusion_core.model import CARD_FILE, LEGACY_CONFIG_FILE
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
    the global tracking URI), register it as a new version of ``name``, alias ``challenger``."""
    checkpoint_dir = Path(checkpoint_dir)
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
            pip_requirements=["diffpipe", "torch==2.14.1", "safetensors"],
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


class UnknownModelError(ValueError):
    """No registered model of that name."""


def registered_model(uri: str, name: str) -> Any:
    """The registered model ``name``; UnknownModelError (naming the known ones) when missing."""
    c = client(uri)
    try:
        return c.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    known = sorted(m.name for m in c.search_registered_models())
    raise UnknownModelError(
        f"no registered model named {name!r} at {uri} "
        f"(registered: {', '.join(known) if known else 'none'})"
    )


def model_versions(uri: str, name: str) -> list[Any]:
    """Every version of the registered model ``name``.

    MLflow's filter strings have no escapes, so ``name`` is quoted with a quote character it does
    not contain; a name with both is matched with LIKE, each quote a one-character wildcard, and
    the results are narrowed to the exact name.
    """
    if "'" not in name:
        query = f"name = '{name}'"
    elif '"' not in name:
        query = f'name = "{name}"'
    else:
        query = "name LIKE '" + name.replace("'", "_").replace('"', "_") + "'"
    return [v for v in client(uri).search_model_versions(query) if v.name == name]


def source_runs(uri: str, run_ids: list[str]) -> pd.DataFrame:
    """The runs that produced registered versions, indexed by run id, with ``mlflow.search_runs``'
    columns (``status``, ``start_time``, ``params.<k>``, ``tags.<k>``). Searched through the
    client: ``mlflow.search_runs`` reads the global tracking URI, and setting that rewrites the
    process's ``MLFLOW_TRACKING_URI``."""
    if not run_ids:
        return pd.DataFrame()
    c = client(uri)
    experiments = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    quoted = ", ".join(f"'{r}'" for r in sorted(set(run_ids)))
    runs = c.search_runs(
        experiments, f"attributes.run_id IN ({quoted})", run_view_type=ViewType.ALL
    )
    rows = [
        {
            "run_id": r.info.run_id,
            "status": r.info.status,
            "start_time": pd.Timestamp(r.info.start_time, unit="ms"),
            **{f"params.{k}": v for k, v in r.data.params.items()},
            **{f"tags.{k}": v for k, v in r.data.tags.items()},
        }
        for r in runs
    ]
    return pd.DataFrame(rows).set_index("run_id") if rows else pd.DataFrame()


def _decision(
    version: str, evaluation: dict[str, Any] | None, champion: Champion | None
) -> tuple[str, str]:
    """What the promotion rule says of ``version`` against the current champion, and why."""
    if champion is not None and version == champion.version:
        return "champion", "the current champion"
    if evaluation is None:
        return "not evaluated", "no evaluation recorded on this version"
    decision = decide(evaluation, champion)
    return ("promote" if decision.promote else "keep champion"), decision.reason


def comparison_table(uri: str, name: str) -> pd.DataFrame:
    """Every registered version of ``name``: its aliases, the decision the promotion rule gives
    it against the current champion (and why), its source run (``mlflow.search_runs``) and the
    metrics and metric record of its evaluation. UnknownModelError for an unknown name."""
    model = registered_model(uri, name)
    versions = model_versions(uri, name)
    # Search results leave aliases out; the registered model maps alias -> version.
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    evaluations = {str(v.version): json.loads(v.tags.get(EVALUATION_TAG, "null")) for v in versions}
    champion_version = next((v for v, a in aliases.items() if CHAMPION in a), None)
    champion = (
        None
        if champion_version is None
        else Champion(champion_version, evaluations.get(champion_version))
    )
    runs = source_runs(uri, [v.run_id for v in versions if v.run_id])
    rows = []
    for v in versions:
        evaluation = evaluations[str(v.version)]
        decision, reason = _decision(str(v.version), evaluation, champion)
        recorded = get_decision(dict(v.tags))  # what the version's own evaluation decided
        run = runs.loc[v.run_id] if v.run_id in runs.index else pd.Series(dtype=object)
        rows.append(
            {
                "version": int(v.version),
                "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                "decision": decision,
                "reason": reason,
                "decided": None if recorded is None else recorded["reason"],
                "guardrails": None if recorded is None else guardrail_text(recorded),
                "parent": v.tags.get(PARENT_TAG),
                "created": pd.Timestamp(v.creation_timestamp, unit="ms"),
                "run_id": v.run_id,
                "run_name": run.get("tags.mlflow.runName"),
                "run_status": run.get("status"),
                "train_steps": run.get("params.train.steps"),
                **{f"metrics.{k}": val for k, val in (evaluation or {}).get("metrics", {}).items()},
                **{f"record.{k}": val for k, val in (evaluation or {}).get("record", {}).items()},
            }
        )
    if not rows:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    return pd.DataFrame(rows).sort_values("version").reset_index(drop=True)


COMPARISON_COLUMNS = [
    "version",
    "aliases",
    "decision",
    "reason",
    "created",
    "run_id",
    "run_name",
    "run_status",
    "train_steps",
    "decided",
    "guardrails",
    "parent",
]

# Report columns: comparison-table column -> heading in the run report.
REPORT_COLUMNS = {
    "version": "version",
    "aliases": "aliases",
    "metrics.fid": "FID",
    "metrics.fid_low": "FID low",
    "metrics.fid_high": "FID high",
    "metrics.fid_floor_half": "FID floor",
    "metrics.conditional_accuracy": "cond. accuracy",
    "metrics.precision": "precision",
    "metrics.recall": "recall",
    "metrics.memorisation_flag_rate": "memorisation",
    "metrics.safety_flag_rate": "quarantined",
    "decision": "decision",
    "reason": "reason",
    "guardrails": "guardrails",
}


def report_rows(table: pd.DataFrame, *, last: int = 10) -> list[dict[str, Any]]:
    """The last ``last`` versions of a comparison table, with the report's columns and headings
    (JSON-safe: NaN becomes None)."""
    columns = [c for c in REPORT_COLUMNS if c in table.columns]
    shown = table.tail(last)[columns].rename(columns=REPORT_COLUMNS)
    rows: list[dict[str, Any]] = json.loads(shown.to_json(orient="records"))
    return rows


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


def guardrail_text(decision: dict[str, Any]) -> str:
    """The guardrails of a recorded decision in a few words: the failed ones, or all passed."""
    rules = [r for r in decision.get("rules", []) if r["rule"] != "fid"]
    if not rules:
        return ""
    failed = [r for r in rules if r["passed"] is False]
    if not failed:
        return "all passed"
    return "; ".join(
        f"{r['rule']} {r['challenger']:.3g} vs {r['champion']:.3g} ({r['limit']})" for r in failed
    )
