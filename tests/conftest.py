from __future__ import annotations

import socket
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
    "sample": {"sampler": "ddim", "steps": 5, "num_samples": 8, "guidance_scale": 2.0},
}


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
