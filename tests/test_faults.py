"""Faults, each ending in a known state: a store that refuses, stalls or answers 500 fails the
operation with the URL in bounded tries; a full disk fails with a message; kill -9 in training
resumes exactly; a killed run leaves no server behind and its MLflow run is closed on the next
start; a run that fails after registration leaves no challenger."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diffusion_core.pipeline.errors import ArtefactNotFoundError, StorageError
from diffusion_core.pipeline.store import ArtefactStore
from tests.conftest import moto_s3
from tests.faults import FaultyProxy, alive, children, command_line, kill_all

BUCKET = "diffpipe-fault-tests"
HANG_GUARD_S = 120  # far above any bound below: only a hang reaches it
SERVERS = ("diffpipe.flows.server", "prefect.server.api.server")  # a Prefect API process


# ----------------------------------------------------------------------------------------------
# The store: refused, stalled, 500s.


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """moto's S3 server on loopback with one bucket, and the AWS environment it needs."""
    import boto3

    with (
        pytest.MonkeyPatch.context() as env,
        moto_s3(env, tmp_path_factory.mktemp("aws")) as endpoint,
    ):
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        host, port = endpoint.removeprefix("http://").rsplit(":", 1)
        yield host, int(port)


@pytest.fixture
def proxy(moto: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyProxy]:
    """A faulty proxy in front of moto, as the endpoint; short timeouts, two tries a request."""
    monkeypatch.setenv("DIFFPIPE_STORE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("DIFFPIPE_STORE_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("DIFFPIPE_STORE_ATTEMPTS", "2")
    with FaultyProxy(moto) as faulty:
        monkeypatch.setenv("AWS_ENDPOINT_URL", faulty.endpoint)
        yield faulty


def guarded(operation: Callable[[], Any]) -> BaseException | None:
    """What ``operation`` raised (None: nothing), run in a thread so that a hang fails the test
    instead of stopping the suite."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            operation()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_GUARD_S)
    assert not worker.is_alive(), "the store operation hung"
    return raised[0]


def chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


@pytest.mark.parametrize(
    ("mode", "cause"),
    [("stall", "ReadTimeoutError"), ("error", "InternalError"), ("refuse", "")],
)
def test_a_faulty_endpoint_fails_each_operation_naming_the_url(
    proxy: FaultyProxy, tmp_path: Path, mode: str, cause: str
) -> None:
    """Every request is tried DIFFPIPE_STORE_ATTEMPTS times, each bounded by the timeouts,
    then the operation fails with a StorageError naming the URL, which the tasks retry."""
    from diffpipe.tasks.steps import transient

    store = ArtefactStore(f"s3://{BUCKET}/{uuid.uuid4().hex}")
    store.put_bytes("kept.bin", b"kept")  # through the proxy while it forwards
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    proxy.mode = mode
    operations: dict[str, Callable[[], Any]] = {
        "put_bytes": lambda: store.put_bytes("new.bin", b"x"),
        "get_bytes": lambda: store.get_bytes("kept.bin"),
        "list": lambda: store.list(""),
        "put_dir": lambda: store.put_dir("dir", src),
    }
    for name, operation in operations.items():
        before = proxy.connections.get(mode, 0)
        exc = guarded(operation)
        assert isinstance(exc, StorageError), (name, exc)
        assert not isinstance(exc, ArtefactNotFoundError), name
        assert exc.url.startswith(store.root) and exc.url in str(exc), name
        assert transient(exc), name  # the task retries it
        if cause:
            assert cause in " ".join(f"{type(e).__name__} {e}" for e in chain(exc)), name
        if mode == "stall":  # each try opens a connection and waits one read timeout
            assert proxy.connections[mode] - before == 2, name
    # Nothing new became visible.
    proxy.mode = "forward"
    assert store.list("") == ["kept.bin"]
    assert not store.exists_dir("dir")


def test_botocore_timeouts_and_refusals_are_transient() -> None:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
    from diffpipe.tasks.steps import transient

    url = "http://127.0.0.1:9/bucket/key"
    assert transient(ReadTimeoutError(endpoint_url=url))
    assert transient(ConnectTimeoutError(endpoint_url=url))
    assert transient(EndpointConnectionError(endpoint_url=url))
    assert not transient(ValueError("bad data"))
    assert not transient(ArtefactNotFoundError("get_bytes", url, "not found"))


# ----------------------------------------------------------------------------------------------
# A full disk.


def test_a_full_disk_fails_the_write_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while a checkpoint directory is committed to a local store: a StorageError naming
    the file's URL and "No space left on device"; the directory stays uncommitted, no staged
    temporary is left behind."""
    import builtins

    store = ArtefactStore(str(tmp_path / "store"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(os.urandom(4096))
    (src / "card.json").write_bytes(b"{}")
    real_open = builtins.open

    class FullDisk:
        """A file whose writes fail as on a full disk."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        inside = str(file).startswith(str(tmp_path / "store"))
        return FullDisk(handle) if inside and "w" in mode else handle

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(StorageError, match="No space left on device") as info:
        store.put_dir("runs/r1/checkpoint", src)
    monkeypatch.undo()
    assert info.value.url.startswith(store.url("runs/r1/checkpoint/"))
    assert not store.exists_dir("runs/r1/checkpoint")
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert leftovers == []


# ----------------------------------------------------------------------------------------------
# kill -9.


def _cli(home: Path, *args: str) -> subprocess.Popen[str]:
    """``diffpipe ARGS`` in a new session, with ``home`` as DIFFPIPE_HOME and no Prefect or MLflow
    server from the environment; its output goes to a file (``_output``), never a pipe that
    could fill up while nobody reads it."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
        "DIFFPIPE_HOME": str(home),
    }
    with open(home.parent / f"out-{time.monotonic_ns()}.log", "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "diffpipe.flows.cli", *args],
            env=env,
            cwd=home.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    process.output = Path(out.name)  # type: ignore[attr-defined]
    return process


def _output(process: subprocess.Popen[str]) -> str:
    return Path(process.output).read_text()  # type: ignore[attr-defined]


def _finish(process: subprocess.Popen[str]) -> str:
    process.wait(900)
    return _output(process)


def _wait_for(what: str, ready: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 600
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"exited {process.returncode} before {what}:\n{_output(process)[-3000:]}")
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.1)


def _latest_step(checkpoints: Path) -> int:
    pointer = checkpoints / "latest"
    text = pointer.read_text().strip() if pointer.is_file() else ""
    return int(text.removeprefix("step-")) if text else 0


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    checkpoint = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    return {
        name: load_file(checkpoint / name) for name in ("weights.safetensors", "ema.safetensors")
    }


@pytest.mark.slow
def test_kill_9_in_training_resumes_exactly(tmp_path: Path, tiny_config_dict: dict) -> None:
    """``diffpipe train`` killed with SIGKILL once a checkpoint is written, then run again, ends
    with the same weights and EMA, bit for bit, as a training never interrupted."""
    import torch
    import yaml

    tiny_config_dict["train"] |= {"steps": 60, "checkpoint_every": 4, "num_threads": 1}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict))
    home = tmp_path / "home"
    home.mkdir()
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = ["train", "--config", str(config), "--quiet", "--out"]
    reference = _cli(home, *args, str(straight))  # beside the other: one thread each
    first = _cli(home, *args, str(killed))
    try:
        _wait_for("a checkpoint", lambda: _latest_step(killed / "checkpoints") >= 4, first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        stopped_at = _latest_step(killed / "checkpoints")
        assert 4 <= stopped_at < 60, "killed too late to test a resume"
        again = _cli(home, *args, str(killed))
        for process in (again, reference):
            log = _finish(process)
            assert process.returncode == 0, log
    finally:
        kill_all([first.pid, reference.pid])
    assert _latest_step(killed / "checkpoints") == _latest_step(straight / "checkpoints") == 60
    resumed, uninterrupted = _weights(killed), _weights(straight)
    for name, tensors in uninterrupted.items():
        for key, tensor in tensors.items():
            assert torch.equal(resumed[name][key], tensor), f"{name}:{key} differs after resume"


@pytest.mark.slow
@pytest.mark.scenario  # a minute or more: make test-scenarios
def test_a_killed_run_leaves_no_server_and_the_next_run_cleans_up(
    tmp_path: Path, tiny_config_dict: dict
) -> None:
    """kill -9 of ``diffpipe run`` while it trains: its temporary Prefect server stops by itself;
    the next run of the model marks the killed MLflow run KILLED, removes the staging a killed
    checkpoint write leaves, resumes the training and finishes."""
    import mlflow
    import yaml

    from tests.test_nightly import pattern_folder

    pattern_folder(tmp_path / "images", 16)  # 32 small images: the judge trains in a moment
    cfg = tiny_config_dict | {"name": "killed"}
    cfg["data"] = {"kind": "folder", "root": str(tmp_path / "images"), "image_size": 8}
    cfg["data"] |= {"holdout_fraction": 0.25}
    cfg["train"] |= {"steps": 60, "checkpoint_every": 5, "num_threads": 1}
    cfg["pipeline"] = {"num_samples": 16, "shards": 1}
    cfg["sample"] |= {"steps": 3, "batch_size": 64}
    cfg["evaluation"] = {"interval_draws": 5}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    home = tmp_path / "home"
    home.mkdir()

    first = _cli(home, "run", "--config", str(config))
    server: list[int] = []
    try:
        _wait_for(
            "a checkpoint",
            lambda: any(_latest_step(p) >= 5 for p in home.glob("work/*/checkpoints")),
            first,
        )
        server = [p for p in children(first.pid) if any(m in command_line(p) for m in SERVERS)]
        assert len(server) == 1, [command_line(p) for p in children(first.pid)]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 60
        while alive(server[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(server[0]), "the temporary Prefect server outlived the command"
    finally:
        kill_all([first.pid, *server])

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("diffpipe-killed")
    (killed,) = client.search_runs([experiment.experiment_id])
    assert killed.info.status == "RUNNING"  # nothing could end it
    # What a kill in the middle of writes leaves: a checkpoint's staging, a store file's staging.
    (work,) = home.glob("work/train-*/checkpoints")
    (work / ".tmp-step-0000999-x").mkdir()
    (work / ".tmp-step-0000999-x" / "weights.safetensors").write_bytes(b"half")
    store_tmp = home / "artefacts" / "runs" / killed.info.run_id / "checkpoint" / ".tmp"
    store_tmp.mkdir(parents=True)
    (store_tmp / ".weights.safetensors.tmp-x").write_bytes(b"half")

    second = _cli(home, "run", "--config", str(config))
    log = _finish(second)
    assert second.returncode == 0, log[-3000:]
    assert "training: " in log and " steps run" in log
    steps_run = int(log.split("training: ")[1].split(" steps run")[0])
    assert steps_run < 60  # resumed from the killed run's checkpoint
    closed = client.get_run(killed.info.run_id)
    assert closed.info.status == "KILLED" and "diffpipe.killed" in closed.data.tags
    assert not (work / ".tmp-step-0000999-x").exists() and not store_tmp.exists()
    assert [p for p in children(second.pid) if alive(p)] == []


# ----------------------------------------------------------------------------------------------
# MLflow and staging after a failure (a failure after registration, in a flow:
# tests/test_pipeline.py).


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow database on SQLite for the tests below (made once: its tables take a while)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_only_runs_whose_process_is_gone_are_closed(tmp_path: Path, tracking_uri: str) -> None:
    """A RUNNING run of a dead process on this host is marked KILLED; a live process's run, a
    run from another host and a run of another flow are left alone."""
    import socket

    import mlflow
    from diffpipe.tasks import recovery

    uri = tracking_uri
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("diffpipe-m", artifact_location=str(tmp_path / "a"))
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    host = socket.gethostname()
    runs = {
        "dead": {"diffpipe.pid": str(gone.pid), "diffpipe.host": host},
        "alive": {"diffpipe.pid": str(os.getpid()), "diffpipe.host": host},
        "elsewhere": {"diffpipe.pid": str(gone.pid), "diffpipe.host": host + "-other"},
        "untagged": {},
    }
    ids = {
        name: client.create_run(experiment, tags={"diffpipe.flow": "nightly", **tags}).info.run_id
        for name, tags in runs.items()
    }
    other_flow = client.create_run(experiment, tags={"diffpipe.flow": "evaluate", **runs["dead"]})
    assert recovery.close_stale_runs(uri, "diffpipe-m", "nightly") == [ids["dead"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {
        "dead": "KILLED",
        "alive": "RUNNING",
        "elsewhere": "RUNNING",
        "untagged": "RUNNING",
    }
    assert client.get_run(other_flow.info.run_id).info.status == "RUNNING"
    assert recovery.close_stale_runs(uri, "no-such-experiment", "nightly") == []


def test_a_version_taken_back_gives_the_champion_alias_back(
    tmp_path: Path, tracking_uri: str
) -> None:
    import mlflow
    from diffpipe.tasks import recovery, tracking

    uri = tracking_uri
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", str(tmp_path / "model"))
    client.set_registered_model_alias("m", "champion", "1")
    client.set_registered_model_alias("m", "challenger", "2")
    second = tracking.ModelRef("m", "2", ["challenger"], "models:/m/2")
    recovery.retract(uri, second, "run r failed: boom", promoted=False, champion_before="1")
    assert client.get_model_version("m", "2").aliases == []
    assert client.get_model_version("m", "2").tags["diffpipe.failed"] == "run r failed: boom"
    # A run that promoted its version, then failed: the champion goes back to the one before.
    client.set_registered_model_alias("m", "challenger", "3")
    client.set_registered_model_alias("m", "champion", "3")
    third = tracking.ModelRef("m", "3", ["challenger", "champion"], "models:/m/3")
    recovery.retract(uri, third, "run s failed", promoted=True, champion_before="1")
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert client.get_model_version("m", "3").aliases == []
    # ... or goes away when there was none.
    client.set_registered_model_alias("m", "champion", "3")
    recovery.retract(uri, third, "run t failed", promoted=True, champion_before=None)
    assert client.get_registered_model("m").aliases == {}


def test_staging_is_removed_only_where_no_live_run_writes(tmp_path: Path) -> None:
    from diffusion_core.pipeline.cleanup import remove_run_staging, remove_stale_staging
    from diffusion_core.pipeline.lock import hold

    work = tmp_path / "work"
    for name in ("train-idle", "train-busy"):
        staging = work / name / "checkpoints" / ".tmp-step-0000010-abc"
        staging.mkdir(parents=True)
        (staging / "weights.safetensors").write_bytes(b"half")
        (work / name / "checkpoints" / "step-0000005").mkdir()
    with hold(work / "train-busy.lock", what="training directory", owner={"run": "live"}):
        removed = remove_stale_staging(work)
    assert removed == [work / "train-idle" / "checkpoints" / ".tmp-step-0000010-abc"]
    assert (work / "train-busy" / "checkpoints" / ".tmp-step-0000010-abc").is_dir()
    assert (work / "train-idle" / "checkpoints" / "step-0000005").is_dir()  # checkpoints stay

    store = ArtefactStore(str(tmp_path / "store"))
    store.put_bytes("runs/dead/samples/shard-00000/images.safetensors", b"x")
    for run in ("dead", "alive"):
        tmp = store.local_path(f"runs/{run}/checkpoint") / ".tmp"
        tmp.mkdir(parents=True)
        (tmp / ".weights.safetensors.tmp-1").write_bytes(b"half")
    assert remove_run_staging(store, "dead") == [store.local_path("runs/dead/checkpoint") / ".tmp"]
    assert store.list("runs/dead") == ["runs/dead/samples/shard-00000/images.safetensors"]
    assert (store.local_path("runs/alive/checkpoint") / ".tmp").is_dir()
