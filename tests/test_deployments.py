"""A real `prefect server start` on loopback: the deployments register from prefect.yaml, and a
registration's event starts the evaluation deployment, which a process worker runs to the end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, stop_process
from tests.test_pipeline import PIPELINE_TINY

pytestmark = [pytest.mark.slow, pytest.mark.scenario]

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, *, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own SQLite database; stopped afterwards."""
    home = tmp_path_factory.mktemp("server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "DIFFPIPE_HOME": str(home / "diffpipe"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "DIFFPIPE_RETRY_DELAYS": "0.5,1",
        "DO_NOT_TRACK": "1",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, timeout=120, what="the Prefect server")
        yield env, home
    finally:
        stop_process(proc)
        log.close()


async def _deployments():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployments()


async def _flow_runs(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def test_deployments_and_triggered_evaluation(server, tmp_path, monkeypatch):
    env, home = server
    for key in ("DIFFPIPE_HOME", "MLFLOW_TRACKING_URI", "DIFFPIPE_RETRY_DELAYS"):
        monkeypatch.setenv(key, env[key])
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        try:
            check_deployments_and_trigger(env, home, tmp_path)
        finally:
            drain_prefect_workers()  # while the server is up: later tests get clean workers


def drain_prefect_workers() -> None:
    """Flush this process's log and event workers to the server they were started for."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for result in (APILogWorker.drain_all(timeout=30), EventsWorker.drain_all(timeout=30)):
            if asyncio.iscoroutine(result) or asyncio.isfuture(result):
                await result

    run_coro_as_sync(drain())


def check_deployments_and_trigger(env, home, tmp_path):
    # Register the packaged deployments on a pool of our own, from a directory that is not the
    # checkout (module entrypoints); the evaluation deployment gets the tiny config.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(PIPELINE_TINY | {"name": "triggered"}))
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        if deployment["name"] == "evaluate":
            deployment["parameters"]["config"] = str(config)
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    deploy = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffpipe.flows.cli",
            "deploy",
            "--prefect-file",
            str(prefect_file),
            "--pool",
            "nightly-cpu",
        ],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "created work pool 'nightly-cpu'" in deploy.stdout
    deployments = {d.name: d for d in asyncio.run(_deployments())}
    assert set(deployments) == {"nightly-train", "evaluate", "compare"}
    assert {d.work_pool_name for d in deployments.values()} == {"nightly-cpu"}
    nightly = deployments["nightly-train"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["evaluate"] is False
    assert nightly.global_concurrency_limit.limit == 1  # one nightly run at a time
    assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deployments["evaluate"].entrypoint == "diffpipe.flows.pipeline:evaluate_model"
    assert "automation 'diffpipe-model-rejected' registered" in deploy.stdout

    # A worker for the process pool, then a training run that registers a model.
    worker_log = open(home / "worker.log", "w")  # noqa: SIM115 - lives as long as the worker
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            *("--pool", "nightly-cpu", "--limit", "1"),
        ],
        env=env,
        cwd=elsewhere,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        from diffpipe.flows.pipeline import nightly as nightly_flow

        # Version 1 is evaluated by the flow that registers it: its event asks for nothing.
        first = nightly_flow(config=str(config), evaluate=True)
        assert first["model"]["version"] == "1" and first["promotion"]["promoted"]
        # Version 2 (the same weights: the training is complete) asks for an evaluation.
        summary = nightly_flow(config=str(config), evaluate=False)
        assert summary["model"]["version"] == "2" and summary["training"]["steps_run"] == 0

        # The registration event starts the evaluate deployment; the worker runs it through.
        evaluate_id = deployments["evaluate"].id

        def finished():
            runs = asyncio.run(_flow_runs(evaluate_id))
            done = [r for r in runs if r.state and r.state.is_final()]
            return runs if done else None

        runs = wait_for(finished, timeout=420, what="the triggered evaluation", interval=3)
        log = (home / "worker.log").read_text()[-3000:]
        (run,) = runs  # version 1 was never evaluated twice
        assert run.state.is_completed(), f"{run.state}\n{log}"
        assert run.parameters["model_uri"] == "models:/triggered/2"

        # Version 2 ties with the champion and is rejected; the automation runs `compare`.
        compare_id = deployments["compare"].id
        compared = wait_for(
            lambda: asyncio.run(_flow_runs(compare_id)),
            timeout=120,
            what="the comparison started by the rejection",
            interval=2,
        )
        assert compared[0].parameters["model_name"] == "triggered"
    finally:
        stop_process(worker)
        worker_log.close()

    import mlflow

    client = mlflow.MlflowClient()
    one, two = (client.get_model_version("triggered", v) for v in ("1", "2"))
    assert "champion" in one.aliases and "champion" not in two.aliases
    assert "diffpipe.evaluation" in two.tags  # the triggered evaluation recorded its metrics
    decision = json.loads(two.tags["diffpipe.decision"])
    assert not decision["promoted"] and decision["previous_champion"] == "1"
