"""The nightly loop night after night: new data is seen, promotion stays fair across data
changes and obeys its guardrails, a night can start from the champion, runs on one home take
turns, and each registered version installs and predicts on its own."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from diffusion_core.config import DataConfig


def noise_png(seed: int, size: int = 10) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return out.getvalue()


def image_folder(root: Path, count: int, *, start: int = 0) -> Path:
    """``count`` PNGs in two class folders (`a` and `b`)."""
    for i in range(start, start + count):
        path = root / ("a" if i % 2 else "b") / f"img-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(noise_png(i))
    return root


# ----------------------------------------------------------------------------------------------
# Data identity from content.


def prepare_twice_flow():
    from diffpipe.tasks import steps
    from prefect import flow

    @flow
    def prepare(data: DataConfig, root: str) -> tuple[dict, bool]:
        ref, cached = steps.prepare_dataset_cached(data, root)
        return {"sha256": ref.sha256, "n": ref.num_train + ref.num_holdout}, cached

    return prepare


def test_new_changed_or_deleted_files_give_a_new_dataset(harness, tmp_path) -> None:
    folder = image_folder(tmp_path / "images", 20)
    data = DataConfig(kind="folder", root=str(folder), image_size=8, holdout_fraction=0.2)
    prepare, root = prepare_twice_flow(), str(tmp_path / "store")

    first, cached = prepare(data, root)
    assert (cached, first["n"]) == (False, 20)
    assert prepare(data, root) == (first, True)  # same contents: Cached

    (folder / "a" / "img-0100.png").write_bytes(noise_png(100))  # a new image
    added, cached = prepare(data, root)
    assert not cached and added["n"] == 21 and added["sha256"] != first["sha256"]

    (folder / "b" / "img-0002.png").write_bytes(noise_png(999))  # same name, new pixels
    os.utime(folder / "b" / "img-0002.png", (1, 1))
    changed, cached = prepare(data, root)
    assert not cached and changed["n"] == 21 and changed["sha256"] != added["sha256"]

    (folder / "a" / "img-0100.png").unlink()
    deleted, cached = prepare(data, root)
    assert not cached and deleted["n"] == 20
    assert prepare(data, root) == (deleted, True)


def test_the_fingerprint_of_a_folder_on_s3_follows_its_objects(s3_for_data) -> None:
    import s3fs

    from diffusion_core.data import source_fingerprint

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_for_data)
    fs.mkdir("nightly-data")
    fs.pipe({f"nightly-data/set/a/{i}.png": noise_png(i) for i in range(4)})
    data = DataConfig(kind="folder", root="s3://nightly-data/set", image_size=8)
    first = source_fingerprint(data)
    assert source_fingerprint(data) == first
    fs.pipe({"nightly-data/set/a/9.png": noise_png(9)})
    added = source_fingerprint(data)
    fs.pipe({"nightly-data/set/a/0.png": noise_png(50)})  # same key, new content (new ETag)
    changed = source_fingerprint(data)
    fs.rm("nightly-data/set/a/9.png")
    deleted = source_fingerprint(data)
    assert len({first, added, changed, deleted}) == 4
    fs.pipe({"nightly-data/set/a/0.png": noise_png(0)})  # the original bytes again
    assert source_fingerprint(data) == first  # S3 ETags follow the content


def test_a_missing_data_root_is_named(tmp_path) -> None:
    from diffusion_core.data import DatasetError, source_fingerprint

    with pytest.raises(DatasetError, match=r"nowhere: data.root not found"):
        source_fingerprint(DataConfig(kind="folder", root=str(tmp_path / "nowhere")))
    assert source_fingerprint(DataConfig(kind="digits")) == "builtin:digits"


@pytest.fixture
def s3_for_data(monkeypatch, tmp_path):
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    try:
        yield endpoint
    finally:
        server.stop()
