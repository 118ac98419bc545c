"""The servers a team shares, for real: PostgreSQL (Debian's package) on loopback under a
`prefect server` and an `mlflow server`, artefacts and MLflow artifacts in S3 (moto's server).
The deployments register, a worker runs the nightly deployment, the registration event starts
the evaluation deployment, and the registry, the bucket and both databases hold the results."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, stop_process
from tests.test_deployments import REPO, drain_prefect_workers, wait_for
from tests.test_pipeline import PIPELINE_TINY

pytestmark = [pytest.mark.slow, pytest.mark.scenario]

PREFECT = [sys.executable, "-m", "prefect"]
MLFLOW = [sys.executable, "-m", "mlflow"]
DIFFPIPE = [sys.executable, "-m", "diffpipe.flows.cli"]


def postgres_bin() -> Path:
    """The directory of Debian's PostgreSQL server programs (initdb, pg_ctl)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    return Path(candidates[-1]).parent


def as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root and there is no `postgres` user to run the server as")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 (trust auth, its own temp directory) with the databases
    `prefect` and `mlflow`; the base URL ``postgresql://postgres@127.0.0.1:PORT``."""
    bindir, prefix = postgres_bin(), as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="diffpipe-pg-"))
    root.chmod(0o755)  # the postgres user has to reach it
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if prefix:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:  # the tool's own words, not only its exit status
            said = (done.stderr.strip() or done.stdout.strip())[-2000:]
            raise RuntimeError(f"{Path(args[0]).name} exited with {done.returncode}: {said}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-h 127.0.0.1 -p {port} -k {sockets}"
        log = root / "server.log"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        import psycopg

        base = f"postgresql://postgres@127.0.0.1:{port}"
        conn = psycopg.connect(f"{base}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE prefect")
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield base
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(root, ignore_errors=True)  # also when initdb or the start failed


@pytest.fixture(scope="module")
def bucket() -> Iterator[tuple[str, dict[str, str]]]:
    """moto's S3 server on 127.0.0.1 with the bucket `team`; its endpoint and the client env."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws = Path(tempfile.mkdtemp(prefix="diffpipe-aws-"))
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="team")
    try:
        yield endpoint, env
    finally:
        server.stop()
        shutil.rmtree(aws, ignore_errors=True)


class Service:
    """A server subprocess with its log, stopped on exit."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, health: str):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, env=env, stdout=self._out, stderr=subprocess.STDOUT)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{args[2:5]} exited:\n{log.read_text()[-3000:]}")
            try:
                return httpx.get(health, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(healthy, timeout=180, what=" ".join(args[2:4]))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)
        self._out.close()


@pytest.fixture(scope="module")
def team(postgres, bucket, tmp_path_factory):
    """A Prefect server and an MLflow server, both on PostgreSQL; the environment a worker and a
    client of both use."""
    aws = bucket[1]
    home = tmp_path_factory.mktemp("team")
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    tracking = f"http://127.0.0.1:{mlflow_port}"
    env = {
        **os.environ,
        **aws,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "DIFFPIPE_HOME": str(home / "diffpipe"),
        "MLFLOW_TRACKING_URI": tracking,
        "DIFFPIPE_RETRY_DELAYS": "0.5,1",
        "DO_NOT_TRACK": "1",
    }
    env.pop("AWS_PROFILE", None)
    prefect_env = env | {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.replace(
            "postgresql://", "postgresql+asyncpg://"
        )
        + "/prefect"
    }
    prefect_server = Service(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        prefect_env,
        home / "prefect-server.log",
        f"{api}/health",
    )
    try:
        mlflow_server = Service(
            [
                *MLFLOW,
                "server",
                *("--backend-store-uri", f"{postgres}/mlflow"),
                *("--no-serve-artifacts", "--default-artifact-root", "s3://team/mlflow-default"),
                *("--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"),
            ],
            env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job consumers needed
            home / "mlflow-server.log",
            f"{tracking}/health",
        )
        try:
            yield env, home
        finally:
            mlflow_server.stop()
    finally:
        prefect_server.stop()


async def _deployments():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {d.name: d for d in await client.read_deployments()}


async def _run(deployment_id, parameters=None):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)


async def _flow_runs(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def finished_run(deployment_id):
    runs = asyncio.run(_flow_runs(deployment_id))
    done = [r for r in runs if r.state and r.state.is_final()]
    return done[0] if done else None


def test_nightly_and_evaluation_on_shared_servers(team, postgres, bucket, tmp_path, monkeypatch):
    env, home = team
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", *bucket[1]):
        monkeypatch.setenv(key, env[key])
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        try:
            check_shared_servers(env, home, postgres, tmp_path)
        finally:
            drain_prefect_workers()


def check_shared_servers(env, home, postgres, tmp_path):
    import boto3
    import mlflow
    import psycopg

    # One config for both deployments: artefacts in the bucket, the shared MLflow server.
    config = tmp_path / "team.yaml"
    cfg = PIPELINE_TINY | {"name": "team"}
    cfg["pipeline"] = cfg["pipeline"] | {
        "artefact_root": "s3://team/diffpipe",
        "tracking_uri": env["MLFLOW_TRACKING_URI"],
    }
    config.write_text(yaml.safe_dump(cfg))
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        if "config" in (deployment.get("parameters") or {}):
            deployment["parameters"]["config"] = str(config)
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    deploy = subprocess.run(
        [*DIFFPIPE, "deploy", "--prefect-file", str(prefect_file), "--pool", "team"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    deployments = asyncio.run(_deployments())
    assert {d.work_pool_name for d in deployments.values()} == {"team"}

    worker_log = home / "worker.log"
    with open(worker_log, "w") as out:
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", "team"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            nightly = deployments["nightly-train"]
            asyncio.run(_run(nightly.id))
            trained = wait_for(
                lambda: finished_run(nightly.id), timeout=600, what="the nightly run", interval=3
            )
            log = worker_log.read_text
            assert trained.state.is_completed(), f"{trained.state}\n{log()[-3000:]}"
            evaluate = deployments["evaluate"]
            evaluated = wait_for(
                lambda: finished_run(evaluate.id),
                timeout=600,
                what="the triggered evaluation",
                interval=3,
            )
            assert evaluated.state.is_completed(), f"{evaluated.state}\n{log()[-3000:]}"
            assert evaluated.parameters["model_uri"] == "models:/team/1"
            assert evaluated.parameters["tracking_uri"] == env["MLFLOW_TRACKING_URI"]
        finally:
            stop_process(worker, timeout=60)

    # The registry on the MLflow server: version 1 evaluated and promoted.
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version("team", "1")
    assert "diffpipe.evaluation" in version.tags
    assert "champion" in version.aliases
    assert version.tags["diffpipe.artefact_root"] == "s3://team/diffpipe"
    evaluation_run = client.get_run(
        client.search_runs(
            [client.get_experiment_by_name("diffpipe-team").experiment_id],
            filter_string="tags.`diffpipe.flow` = 'evaluate'",
        )[0].info.run_id
    )
    assert evaluation_run.info.status == "FINISHED"

    # The bucket: the checkpoint, the published samples, the report and MLflow's artifacts.
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="team")
        for o in page.get("Contents", [])
    ]
    run = evaluation_run.info.run_id
    assert f"diffpipe/evaluations/{run}/report/index.html" in keys
    assert f"diffpipe/evaluations/{run}/metrics.json" in keys
    assert any(k.endswith("checkpoint/ema.safetensors") for k in keys)
    assert any(k.startswith("diffpipe/mlflow/") and k.endswith("ema.safetensors") for k in keys)
    report = s3.get_object(Bucket="team", Key=f"diffpipe/evaluations/{run}/report/index.html")
    assert b"FID" in report["Body"].read()

    # Both servers kept their state in PostgreSQL.
    with psycopg.connect(f"{postgres}/prefect") as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT d.name, r.state_type FROM flow_run r JOIN deployment d"
            " ON r.deployment_id = d.id WHERE r.state_type <> 'SCHEDULED'"  # the cron's next runs
        )
        states = sorted(cur.fetchall())
    assert states == [("evaluate", "COMPLETED"), ("nightly-train", "COMPLETED")]
    with psycopg.connect(f"{postgres}/mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT name, version FROM model_versions")
        assert cur.fetchall() == [("team", 1)]
