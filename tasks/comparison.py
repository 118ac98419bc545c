"""The comparison of a registered model's versions (``diffpipe compare``, the report's table):
aliases, the promotion rule's verdict against the current champion, the decision each version's
own evaluation recorded (with its guardrails), lineage, the source run and the metrics."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from diffpipe.tasks.tracking import (
    CHAMPION,
    EVALUATION_TAG,
    PARENT_TAG,
    client,
    get_decision,
)
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from diffusion_core.evaluation.promotion import Champion, decide


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
