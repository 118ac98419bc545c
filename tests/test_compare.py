"""The promotion rule, and ``diffpipe compare`` against a real MLflow registry on SQLite."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from diffpipe.flows.cli import main
from diffpipe.tasks import comparison, tracking
from mlflow import MlflowClient

from diffusion_core.config import RunConfig
from diffusion_core.evaluation.promotion import RECORD_KEYS, Champion, decide, record_mismatch
from tests.conftest import TINY, card_for

RECORD: dict[str, Any] = {
    "engine": "torch-fidelity 0.4.0",
    "num_reference": 297,
    "nfe": 25,
    "spacing": "leading",
    "eta": 0.0,
    "extractor": "domain",
    "extractor_sha256": "ab" * 32,
    "reference_sha256": "cd" * 32,
    "reference_split": "holdout",
    "num_samples": 1000,
    "sampler": "ddim",
    "steps": 25,
    "guidance_scale": 1.5,
    "guidance_interval": None,
    "seed": 0,
}


def champion(evaluation: dict[str, Any] | None, version: str = "1") -> Champion:
    return Champion(version, evaluation)


def evaluation(fid: float, half_width: float = 1.0, **record: Any) -> dict[str, Any]:
    return {
        "metrics": {"fid": fid, "fid_low": fid - half_width, "fid_high": fid + half_width},
        "record": {**RECORD, **record},
    }


# ----------------------------------------------------------------------------- the rule


def test_clear_win_is_promoted() -> None:
    decision = decide(evaluation(5.0), champion(evaluation(10.0)))  # [4, 6] entirely below [9, 11]
    assert decision.promote
    assert "5.000" in decision.reason and "10.000" in decision.reason


def test_overlapping_intervals_are_a_tie() -> None:
    # the point estimate is better, but [8.5, 10.5] overlaps [9, 11]: the champion stays
    decision = decide(evaluation(9.5), champion(evaluation(10.0)))
    assert not decision.promote
    assert "tie" in decision.reason
    # touching intervals still overlap
    assert not decide(evaluation(8.0), champion(evaluation(10.0))).promote  # [7, 9] vs [9, 11]
    assert decide(evaluation(7.99), champion(evaluation(10.0))).promote
    worse = decide(evaluation(12.0), champion(evaluation(10.0)))
    assert not worse.promote and "not better" in worse.reason


def test_mismatched_records_are_not_compared() -> None:
    # far better FID, but with another sampler and step count: not the same number
    decision = decide(evaluation(1.0, sampler="ddpm", steps=1000), champion(evaluation(10.0)))
    assert not decision.promote
    assert decision.reason == (
        "not comparable: metric records differ in sampler: 'ddpm' vs 'ddim'; steps: 1000 vs 25"
    )
    # a key missing on one side is a difference too; keys outside the record list are not
    record = {k: v for k, v in RECORD.items() if k != "extractor_sha256"}
    missing = decide(
        {"metrics": evaluation(1.0)["metrics"], "record": record}, champion(evaluation(10.0))
    )
    assert not missing.promote and "differ in extractor_sha256: None vs 'abab" in missing.reason
    assert decide(evaluation(1.0, seed=7, note="x"), champion(evaluation(10.0))).promote
    assert set(RECORD_KEYS) <= set(RECORD)


def test_no_champion_yet_promotes() -> None:
    decision = decide(evaluation(50.0), None)
    never = decide(evaluation(50.0), champion(None, "4"))
    assert not never.promote and never.reason == (
        "not comparable: the champion (version 4) was never evaluated"
    )
    assert decision.promote and decision.reason == "no champion yet"


def test_missing_interval_is_not_compared() -> None:
    bare = {"metrics": {"fid": 1.0}, "record": RECORD}
    decision = decide(bare, champion(evaluation(10.0)))
    assert not decision.promote
    assert decision.reason == "not comparable: no challenger fid_low, challenger fid_high"


# ------------------------------------------------------------------- registry and command


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLflow on SQLite with model ``digits``: v1 champion, v2 a clear win, v3 a tie, v4 on
    another sampler, v5 never evaluated; and ``fresh``: one evaluated version, no champion."""
    home = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("diffpipe-digits", artifact_location=(home / "art").as_uri())
    specs: dict[str, list[dict[str, Any] | None]] = {
        "digits": [
            evaluation(10.0),
            evaluation(5.0),
            evaluation(9.5),
            evaluation(2.0, sampler="ddpm"),
            None,
        ],
        "fresh": [evaluation(30.0)],
    }
    for name, evaluations in specs.items():
        c.create_registered_model(name)
        for i, ev in enumerate(evaluations, start=1):
            run = c.create_run(exp, run_name=f"nightly-{name}-{i}")
            c.log_param(run.info.run_id, "train.steps", str(100 * i))
            c.set_terminated(run.info.run_id)
            mv = c.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
            if ev is not None:
                c.set_model_version_tag(name, mv.version, tracking.EVALUATION_TAG, json.dumps(ev))
        c.set_registered_model_alias(name, "challenger", str(len(evaluations)))
    c.set_registered_model_alias("digits", "champion", "1")
    yield uri


def test_comparison_table_decisions(registry: str) -> None:
    table = comparison.comparison_table(registry, "digits")
    assert list(table["version"]) == [1, 2, 3, 4, 5]
    assert list(table["aliases"]) == ["champion", "", "", "", "challenger"]
    assert list(table["decision"]) == [
        "champion",
        "promote",
        "keep champion",
        "keep champion",
        "not evaluated",
    ]
    assert "tie" in table["reason"][2]
    assert table["reason"][3] == (
        "not comparable: metric records differ in sampler: 'ddpm' vs 'ddim'"
    )
    # metric records and metrics from the versions, run details from mlflow.search_runs
    assert list(table["metrics.fid"][:4]) == [10.0, 5.0, 9.5, 2.0]
    assert pd.isna(table["metrics.fid"][4])
    assert list(table["record.sampler"][:4]) == ["ddim", "ddim", "ddim", "ddpm"]
    assert list(table["run_name"]) == [f"nightly-digits-{i}" for i in range(1, 6)]
    assert list(table["train_steps"]) == [str(100 * i) for i in range(1, 6)]
    assert set(table["run_status"]) == {"FINISHED"}

    fresh = comparison.comparison_table(registry, "fresh")
    assert list(fresh["decision"]) == ["promote"]
    assert list(fresh["reason"]) == ["no champion yet"]

    rows = comparison.report_rows(table, last=3)
    assert [r["version"] for r in rows] == [3, 4, 5]
    assert rows[0]["FID low"] == 8.5 and rows[2]["FID"] is None
    assert rows[1]["decision"] == "keep champion"


def test_unevaluated_champion_is_not_comparable(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("m")
    c.create_model_version("m", "file:///nowhere/1")
    v2 = c.create_model_version("m", "file:///nowhere/2")
    c.set_model_version_tag("m", v2.version, tracking.EVALUATION_TAG, json.dumps(evaluation(1.0)))
    c.set_registered_model_alias("m", "champion", "1")
    table = comparison.comparison_table(uri, "m")
    assert list(table["decision"]) == ["champion", "keep champion"]
    assert table["reason"][1] == "not comparable: the champion (version 1) was never evaluated"
    assert table["run_name"].isna().all()  # versions without a source run


def test_cli_compare_prints_the_table(
    registry: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    assert main(["compare", "--model", "digits", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["version"]) == [1, 2, 3, 4, 5]
    assert list(table["decision"])[:2] == ["champion", "promote"]
    assert "record.extractor_sha256" in table.columns
    assert table["record.extractor_sha256"][0] == "ab" * 32

    assert main(["compare", "--model", "digits"]) == 0  # the table for people: short sha256s
    out = capsys.readouterr().out
    assert "ab" * 6 in out and "ab" * 7 not in out and "keep champion" in out

    assert main(["compare", "--model", "digits", "--columns", "version,decision"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["version", "decision"]
    assert lines[2].split() == ["2", "promote"]
    assert len(lines) == 6

    assert main(["compare", "--model", "fresh", "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["decision"] == "promote" and row["metrics.fid"] == 30.0


def test_cli_compare_bad_input_exits_2(
    registry: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    assert main(["compare", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no registered model named 'nope'" in err
    assert "registered: digits, fresh" in err
    assert main(["compare", "--model", "digits", "--columns", "version,bogus"]) == 2
    err = capsys.readouterr().err
    assert "--columns: no column 'bogus'" in err and "decision" in err


def test_refusal_names_each_differing_key_with_both_values() -> None:
    for key in RECORD_KEYS:
        other = {**RECORD, key: "something else"}
        assert record_mismatch(RECORD, other) == [key]
    d = decide(
        evaluation(0.1, 0.01, extractor="inception-v3-compat", nfe=10), champion(evaluation(9.0, 1))
    )
    assert not d.promote
    assert "extractor: 'inception-v3-compat' vs 'domain'" in d.reason
    assert "nfe: 10 vs 25" in d.reason
    # An old record without the new keys is not comparable either.
    old = {k: v for k, v in RECORD.items() if k not in ("engine", "nfe")}
    assert record_mismatch(RECORD, old) == ["engine", "nfe"]
    # A record written before the guidance interval existed guided at every step.
    before = {k: v for k, v in RECORD.items() if k != "guidance_interval"}
    assert record_mismatch(RECORD, before) == []
    assert record_mismatch({**RECORD, "guidance_interval": [0.3, 5.0]}, before) == [
        "guidance_interval"
    ]
    # Seeds are recorded but do not block a comparison: the intervals carry sampling noise.
    assert decide(evaluation(1.0, 0.1, seed=7), champion(evaluation(2.0, 0.1))).promote


def test_names_with_quotes_register_and_compare_through_clients_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registration, the comparison table and the download use clients for the URI they are
    given: MLflow's global URIs stay as they were. Names with quotes work in search filters."""
    import mlflow

    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "ema.safetensors").write_bytes(b"weights")
    card_json = card_for(RunConfig.model_validate(TINY)).to_json()
    (checkpoint / "card.json").write_text(card_json)
    run_id = tracking.start_run(
        uri, "quotes", (tmp_path / "artefacts").as_uri(), run_name="r", params={}, tags={}
    )
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("both__q")  # what the LIKE pattern of both'"q also matches
    c.create_model_version("both__q", "file:///nowhere", run_id)
    for name in ("o'brien", 'say "hi"', "both'\"q"):
        model = tracking.register_model(
            uri, run_id, name=name, checkpoint_dir=checkpoint, tags={"k": "v"}
        )
        assert (model.version, model.aliases) == ("1", ["challenger"])
        table = comparison.comparison_table(uri, name)
        assert list(table["version"]) == [1] and list(table["run_id"]) == [run_id]
        assert list(table["aliases"]) == ["challenger"]
        card, weights = tracking.download_model_files(uri, f"models:/{name}@challenger", tmp_path)
        assert card.read_text() == card_json and weights.read_bytes() == b"weights"
        assert c.get_model_version(name, "1").tags == {"k": "v"}
    # the run lists its logged model; nothing went to the global tracking URI
    assert len(c.get_run(run_id).outputs.model_outputs) == 3
    assert mlflow.get_tracking_uri() == before and os.environ["MLFLOW_TRACKING_URI"] == other
    assert MlflowClient(tracking_uri=other, registry_uri=other).search_registered_models() == []
