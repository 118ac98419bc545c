"""The nightly flow end to end under prefect_test_harness, with MLflow on SQLite, on local disk
and on S3 (moto's server on 127.0.0.1), including a storage outage and an interrupted run."""

from __future__ import annotations

import asyncio
import copy
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.conftest import TINY

pytestmark = pytest.mark.slow

PIPELINE_TINY = copy.deepcopy(TINY)
PIPELINE_TINY["train"].update(
    steps=20, batch_size=32, lr=2e-3, checkpoint_every=10, log_every=5, num_threads=2
)
PIPELINE_TINY["sample"] = {"sampler": "ddim", "steps": 4, "guidance_scale": 1.5, "batch_size": 64}
PIPELINE_TINY["pipeline"] = {"num_samples": 60, "shards": 2}


def write_config(path: Path, **pipeline: object) -> Path:
    cfg = json.loads(json.dumps(PIPELINE_TINY))
    cfg["pipeline"].update(pipeline)
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _task_runs(flow_run_id):
    """The task runs of a flow run and of the flows it ran (the sharded sample step)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        ids = [flow_run_id, *(c.id for c in children)]
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )


async def _logs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        return await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )


def report_artifact(key: str) -> str:
    """The latest markdown of the Prefect artifact ``key``."""
    from prefect.artifacts import Artifact

    artifact = Artifact.get(key)
    assert artifact is not None, key
    return str(artifact.data)


def run_nightly(config: Path, **kwargs):
    from diffpipe.flows.pipeline import nightly

    state = nightly(config=str(config), return_state=True, **kwargs)
    return state


def test_nightly_local_then_rerun(harness, tmp_path):
    config = write_config(tmp_path / "tiny.yaml")
    state = run_nightly(config)
    assert state.is_completed(), state.message
    summary = state.result()

    # Every step is a task run with a name that says what it does.
    names = sorted(tr.name for tr in asyncio.run(_task_runs(state.state_details.flow_run_id)))
    for step in (
        "prepare-dataset",
        "train",
        "register",
        "sample-shard-0",
        "sample-shard-1",
        "safety-filter",
        "evaluate",
        "compare",
        "report",
    ):
        assert any(n.startswith(step) for n in names), (step, names)

    # The summary, the registered model and its pyfunc.
    assert summary["model"]["version"] == "1"
    assert set(summary["model"]["aliases"]) == {"challenger", "champion"}
    assert summary["samples"]["published"] + summary["samples"]["quarantined"] == 60
    for key in ("fid", "kid", "conditional_accuracy", "fid_half_over_floor"):
        assert np.isfinite(summary["metrics"][key])
    model = mlflow.pyfunc.load_model("models:/tiny@challenger")
    images = model.predict({"num_samples": 3, "labels": [1, 2, 3], "steps": 3, "seed": 5})
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8

    # Metrics and the report are in MLflow; the report is on disk under the artefact root.
    run = mlflow.get_run(summary["run_id"])
    assert "fid" in run.data.metrics and run.data.params["train.steps"] == "20"
    report = Path(summary["report_uri"].removeprefix("file://"))
    assert report.is_file() and "<html" in report.read_text().lower()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary["run_id"])}
    assert {"report", "config.json"} <= artifacts
    loss_curve = mlflow.MlflowClient().get_metric_history(summary["run_id"], "train/loss")
    assert [m.step for m in loss_curve] == [5, 10, 15, 20]
    # The Prefect markdown artifact links to the report file.
    assert f"[Open the full report]({report.as_uri()})" in report_artifact("tiny-report")

    # The library's own log lines reach the Prefect run logs.
    logs = asyncio.run(_logs(state.state_details.flow_run_id))
    assert any(r.name.startswith("diffusion_core") for r in logs), {r.name for r in logs}

    # Re-running with other sampling, safety and sharding reuses the prepared dataset (a cache
    # hit) and the trained weights (0 steps: only what changes the weights keys the training),
    # and registers a new version whose card carries the new sampling defaults.
    changed = {"sample.guidance_scale": 2.0, "pipeline.shards": 3, "evaluation.interval_draws": 20}
    state = run_nightly(config, overrides=changed)
    again = state.result()
    assert again["training"] == {"steps": 20, "steps_run": 0}
    assert again["record"]["guidance_scale"] == 2.0
    card = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/tiny/2", dst_path=str(tmp_path / "v2")
    )
    assert (
        json.loads((Path(card) / "artifacts" / "card.json").read_text())["sampling"][
            "guidance_scale"
        ]
        == 2.0
    )
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    prepare = [tr for tr in runs if tr.name.startswith("prepare-dataset")]
    assert [tr.state.name for tr in prepare] == ["Cached"]
    assert summary["dataset"]["cached"] is False
    assert again["dataset"] == {**summary["dataset"], "cached": True}
    assert again["model"]["version"] == "2"
    assert "challenger" in again["model"]["aliases"]
    from diffpipe.tasks import comparison

    table = comparison.comparison_table(os.environ["MLFLOW_TRACKING_URI"], "tiny")
    assert list(table["version"]) == [1, 2]
    assert table["aliases"].str.contains("champion").sum() == 1


def test_nightly_with_inpainting_evaluation(harness, tmp_path):
    inpainting = {
        "enabled": True,
        "num_images": 4,
        "masks": ["centre", "half"],
        "jump_length": 2,
        "resample": 2,
    }
    config = write_config(tmp_path / "inpaint.yaml", inpainting=inpainting)
    state = run_nightly(config, overrides={"name": "tiny-inpaint"})
    summary = state.result()
    names = {tr.name for tr in asyncio.run(_task_runs(state.state_details.flow_run_id))}
    assert any(n.startswith("inpaint-evaluate") for n in names), names
    rows = summary["inpainting"]
    assert [(r["mask"], r["method"]) for r in rows] == [
        ("centre", "repaint"),
        ("centre", "replacement"),
        ("half", "repaint"),
        ("half", "replacement"),
    ]
    assert all(r["known_changed"] == 0 and r["num_images"] == 4 for r in rows)
    metrics = mlflow.get_run(summary["run_id"]).data.metrics
    assert metrics["inpaint/known_region_exact"] == 1.0
    assert metrics["inpaint/half/repaint/psnr"] == pytest.approx(rows[2]["psnr"])
    assert metrics["inpaint/centre/replacement/seam_ratio"] == pytest.approx(rows[1]["seam_ratio"])
    report = Path(summary["report_uri"].removeprefix("file://"))
    assert 'id="inpainting"' in report.read_text()
    assert (report.parent / "img" / "inpainting.png").is_file()
    stored = json.loads((report.parents[1] / "inpainting" / "summary.json").read_text())
    assert stored["rows"] == rows and stored["config"]["resample"] == 2


def test_interrupted_training_resumes(harness, tmp_path, monkeypatch):
    config = write_config(tmp_path / "resume.yaml")
    overrides = {"name": "resume", "train.seed": 3}
    from diffusion_core import training

    original = training.TrainStep.__call__

    def crash_at_15(self, *args, **kwargs):
        if self.step == 15:
            raise KeyboardInterrupt("simulated interrupt")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training.TrainStep, "__call__", crash_at_15)
    with pytest.raises(KeyboardInterrupt):
        run_nightly(config, overrides=overrides, evaluate=False)
    monkeypatch.setattr(training.TrainStep, "__call__", original)
    summary = run_nightly(config, overrides=overrides, evaluate=False).result()
    # The checkpoint at step 10 survived the interrupt: the re-run trained the last 10 only.
    assert summary["training"] == {"steps": 20, "steps_run": 10}
    version = mlflow.MlflowClient().get_model_version("resume", summary["model"]["version"])
    assert version.tags["checkpoint_url"].endswith("/checkpoint")


# ----------------------------------------------------------------------------------------------
# The same flow with its artefacts on S3 (moto's server on 127.0.0.1).


@pytest.fixture(scope="module")
def s3(harness, tmp_path_factory):
    """A moto S3 server on loopback, a bucket, and the environment MLflow and s3fs read."""
    import boto3

    from tests.conftest import moto_s3

    with (
        pytest.MonkeyPatch.context() as env,
        moto_s3(env, tmp_path_factory.mktemp("aws")) as endpoint,
    ):
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="nightly")
        yield client


def bucket_keys(client, bucket="nightly") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_nightly_on_s3(harness, s3, tmp_path):
    config = write_config(tmp_path / "s3.yaml", artefact_root="s3://nightly/diffpipe")
    summary = run_nightly(config, overrides={"name": "tiny-s3"}).result()
    run = summary["run_id"]
    keys = bucket_keys(s3)
    assert summary["report_uri"] == f"s3://nightly/diffpipe/runs/{run}/report/index.html"
    for expected in (
        f"diffpipe/runs/{run}/checkpoint/ema.safetensors",
        f"diffpipe/runs/{run}/samples/shard-00000/images.safetensors",
        f"diffpipe/runs/{run}/safety/audit.jsonl",
        f"diffpipe/runs/{run}/metrics.json",
        f"diffpipe/runs/{run}/report/index.html",
    ):
        assert expected in keys, expected
    assert any(k.startswith("diffpipe/datasets/") and k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("diffpipe/judges/") for k in keys)
    # MLflow's artifacts (the registered model, the report copy) are in the bucket too.
    assert any(k.startswith("diffpipe/mlflow/") and k.endswith("ema.safetensors") for k in keys)
    assert any(k.startswith("diffpipe/mlflow/") and k.endswith("report/index.html") for k in keys)
    # Nothing of this run on local disk outside the caches (training work dir, Prefect results).
    local = [p for p in harness.rglob("*") if run in str(p)]
    assert local == []
    model = mlflow.pyfunc.load_model("models:/tiny-s3@challenger")
    assert model.predict({"num_samples": 2, "steps": 2}).shape == (2, 8, 8, 1)
    # The markdown artifact names the report's object (a browser cannot open s3:// links).
    markdown = report_artifact("tiny-s3-report")
    assert f"`{summary['report_uri']}`" in markdown and "](" not in markdown


def test_storage_outage_fails_cleanly(harness, s3, tmp_path, monkeypatch, capsys, caplog):
    """The endpoint stops while the checkpoint is being stored: the task retries, the run fails
    with a message naming the URL, and no checkpoint or model version becomes visible."""
    from diffpipe.flows.cli import main
    from moto.server import ThreadedMotoServer

    from diffusion_core.pipeline.store import ArtefactStore
    from tests.conftest import free_port

    flaky = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    flaky.start()
    host, port = flaky.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://{host}:{port}")
    s3.create_bucket(Bucket="outage")  # moto keeps one backend per process: both servers see it
    original = ArtefactStore.put_dir
    calls = []

    def put_dir(self, prefix, local_dir):
        if prefix.endswith("/checkpoint"):
            calls.append(prefix)
            flaky.stop()  # idempotent: later tries meet a closed port too
        return original(self, prefix, local_dir)

    monkeypatch.setattr(ArtefactStore, "put_dir", put_dir)
    config = write_config(tmp_path / "outage.yaml", artefact_root="s3://outage/root")
    code = main(["run", "--config", str(config), "--set", "name=outage"])
    err = capsys.readouterr().err
    assert code == 1
    assert "storage failed" in err and "s3://outage/root/" in err
    assert len(calls) == 1  # the checkpoint upload met the outage ...
    retries = [r.getMessage() for r in caplog.records if "Retry" in r.getMessage()]
    assert any("Retry 2/2" in m for m in retries), retries  # ... and the task was retried twice
    assert not [k for k in bucket_keys(s3, "outage") if "/checkpoint/" in k]
    assert mlflow.MlflowClient().search_model_versions("name = 'outage'") == []
    failed = mlflow.search_runs(experiment_names=["diffpipe-outage"])
    assert list(failed["status"]) == ["FAILED"]


def test_a_run_that_fails_after_registering_takes_its_version_back(
    harness, s3, tmp_path, monkeypatch, capsys
):
    """The store answers 500 from the moment the version is registered: the run fails naming the
    step and the URL (exit 1), the version is tagged diffpipe.failed and holds no alias, and
    nothing of the evaluation (samples, safety, report) is committed."""
    from diffpipe.flows.cli import main
    from diffpipe.tasks import tracking

    from diffusion_core.pipeline.store import ArtefactStore
    from tests.faults import FaultyProxy

    host, port = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    proxy = FaultyProxy((host, int(port)))
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(name, proxy.endpoint)
    for name, value in {"CONNECT_TIMEOUT": "1", "READ_TIMEOUT": "0.5", "ATTEMPTS": "2"}.items():
        monkeypatch.setenv(f"DIFFPIPE_STORE_{name}", value)
    register_model = tracking.register_model

    def register_then_fail(*args, **kwargs):
        model = register_model(*args, **kwargs)
        proxy.mode = "error"  # every request from here on gets a 500
        return model

    monkeypatch.setattr(tracking, "register_model", register_then_fail)
    root = "s3://nightly/taken-back"
    config = write_config(tmp_path / "taken-back.yaml", artefact_root=root)
    try:
        code = main(["run", "--config", str(config), "--set", "name=taken-back"])
    finally:
        proxy.mode = "forward"
    err = capsys.readouterr().err
    assert code == 1, err
    assert "storage failed in step register" in err and root in err and "Traceback" not in err
    client = mlflow.MlflowClient()
    (found,) = client.search_model_versions("name = 'taken-back'")
    version = client.get_model_version("taken-back", found.version)
    assert version.aliases == []
    assert "failed" in version.tags["diffpipe.failed"]
    (run,) = mlflow.search_runs(experiment_names=["diffpipe-taken-back"], output_format="list")
    assert run.info.status == "FAILED"
    committed = ArtefactStore(root).list(f"runs/{run.info.run_id}")
    assert committed and all("/checkpoint/" in key for key in committed), committed
    proxy.close()


def test_a_step_that_meets_bad_input_exits_2_naming_the_step(harness, tmp_path, capsys):
    from diffpipe.flows.cli import main

    config = write_config(tmp_path / "folder.yaml")
    missing = tmp_path / "no-such-folder"
    args = ["--set", "data.kind=folder", "--set", f"data.root={missing}", "--set", "name=bad"]
    assert main(["run", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "error in step prepare_dataset" in err and str(missing) in err
    failed = mlflow.search_runs(experiment_names=["diffpipe-bad"])
    assert list(failed["status"]) == ["FAILED"]


def test_run_rejects_unknown_key_before_starting(tmp_path, capsys):
    from diffpipe.flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pipeline": {"shard": 2}}))
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.shard" in err and "shards" in err


def test_evaluate_flow_sweeps_samplers(harness, tmp_path):
    """evaluate_model with a sweep: one row per setting with measured NFE and its paired FID gap
    to the DDPM reference, a table in the store, the cheapest setting that matches the reference,
    and the sweep in the report."""
    from diffpipe.flows.pipeline import evaluate_model

    from diffusion_core.config import EvaluationConfig
    from diffusion_core.pipeline.store import ArtefactStore, default_root

    config = write_config(tmp_path / "sweep.yaml")
    trained = run_nightly(config, overrides={"name": "tiny-sweep"}, evaluate=False).result()
    sweep = [
        {"sampler": "ddpm", "steps": 20},
        {"sampler": "ddim", "steps": 4},
        {"sampler": "dpmpp_2m", "steps": 3},
    ]
    summary = evaluate_model(
        f"models:/tiny-sweep/{trained['model']['version']}",
        evaluation=EvaluationConfig(sweep=sweep, sweep_num_samples=24, interval_draws=10),
    )
    rows = summary["sweep"]["rows"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddpm", 20, 20),
        ("ddim", 4, 4),
        ("dpmpp_2m", 3, 3),
    ]
    for r in rows:
        assert r["fid_low"] < r["fid"] < r["fid_high"] and r["wall_seconds"] > 0
        assert r["num_samples"] == 24 and r["guidance_scale"] == 1.5
    note = summary["sweep"]["note"]
    assert " matches ddpm-20 with " in note or note.startswith("No setting matches ddpm-20")
    # Each row's paired gap to the reference setting (0 for the reference itself).
    assert rows[0]["gap"] == 0.0 and rows[0]["matches"] is True
    for r in rows[1:]:
        assert r["gap_low"] <= r["gap"] <= r["gap_high"] and r["matches"] == (r["gap_low"] <= 0)
    # The table in the store, committed with its JSON twin.
    store = ArtefactStore(default_root())
    prefix = summary["sweep"]["table_uri"].removeprefix(store.root + "/").removesuffix("/sweep.csv")
    assert prefix == f"evaluations/{summary['run_id']}/sweep"
    csv_lines = store.get_bytes(f"{prefix}/sweep.csv").decode().splitlines()
    assert csv_lines[0].startswith("sampler,steps,spacing,nfe,wall_seconds,fid,fid_low,fid_high")
    assert csv_lines[0].endswith(",gap,gap_low,gap_high,matches") and len(csv_lines) == 4
    saved = store.read_json(f"{prefix}/sweep.json")
    assert saved["reference"]["sampler"] == "ddpm" and saved["record"]["safety_filter"] is False
    assert saved["rows"] == rows and saved["note"] == note
    # The main evaluation's record, and the sweep in the report.
    record = summary["record"]
    assert record["engine"].startswith("torch-fidelity") and record["extractor"] == "domain"
    assert record["nfe"] == 4 and len(record["extractor_sha256"]) == 64
    report = Path(summary["report_uri"].removeprefix("file://"))
    html = report.read_text()
    assert "Quality against cost" in html and note.split(" (")[0] in html
    assert (report.parent / "img" / "sweep_nfe.png").is_file()

    # Without a config: the card's sampling (DDIM 4 steps, guidance 1.5), not the training
    # run's pipeline section; with one, its sample and pipeline sections.
    from diffusion_core.config import parse_config

    given = parse_config(
        {
            "sample": {"steps": 3},
            "pipeline": {"num_samples": 20, "shards": 1},
            "evaluation": {"interval_draws": 5},
        }
    )
    other = evaluate_model(f"models:/tiny-sweep/{trained['model']['version']}", config=given)
    assert (other["record"]["steps"], other["record"]["guidance_scale"]) == (3, 1.5)
    assert other["samples"]["published"] + other["samples"]["quarantined"] == 20
