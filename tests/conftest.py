from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

TINY = {
    "name": "tiny",
    "data": {"kind": "digits", "image_size": 8},
    "model": {
        "base_channels": 16,
        "channel_mults": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [4],
        "num_heads": 2,
    },
    "diffusion": {"num_steps": 100},
    "train": {
        "steps": 6,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 2,
        "checkpoint_every": 3,
        "log_every": 1,
        "num_threads": 1,
    },
    "sample": {"sampler": "ddim", "steps": 5, "guidance_scale": 2.0},
}


def card_for(cfg, *, in_channels: int = 1, image_size: int = 8, num_classes: int | None = 10):
    """The model card of ``cfg``'s model on made-up data of that shape (sampling: cfg's)."""
    from diffusion_core.model import ModelCard

    return ModelCard(
        model=cfg.model,
        diffusion=cfg.diffusion,
        text=cfg.text,
        sampling=cfg.sample.defaults(),
        in_channels=in_channels,
        image_size=image_size,
        class_names=tuple(str(i) for i in range(num_classes or 0)),
        num_classes=num_classes,
        dataset_sha256="0" * 64,
    )


@pytest.fixture
def tiny_config_dict() -> dict:
    import copy

    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_config_file(tmp_path: Path, tiny_config_dict: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))
    return path


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Small tensors: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, and SIGKILL when the process has not ended within ``timeout`` seconds (a server
    or worker still finishing a request or a flow run it had picked up)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_s3(env: pytest.MonkeyPatch, aws_dir: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, with throwaway credentials and AWS files under ``aws_dir``
    set through ``env`` (no profile); yields its endpoint and stops the server afterwards."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
    env.delenv("AWS_PROFILE", raising=False)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One Prefect test API per test module; DIFFPIPE_HOME and MLflow in a temp dir."""
    import mlflow

    home = tmp_path_factory.mktemp("home")
    saved = dict(os.environ)
    os.environ.update(
        DIFFPIPE_HOME=str(home),
        DIFFPIPE_RETRY_DELAYS="0.5,1",
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
    )
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = {PREFECT_LOCAL_STORAGE_PATH: home / "prefect-results"}
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with prefect_test_harness(server_startup_timeout=120), temporary_settings(updates=results):
        yield home
    os.environ.clear()
    os.environ.update(saved)
