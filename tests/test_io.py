"""The one place for reading images and fetching weights: every reader applies a named policy,
and a fetch that fails leaves nothing in the cache."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.io import (
    CONVERT,
    EXACT,
    ImageReadError,
    WeightsError,
    fetch_weights,
    read_image,
    sha256_file,
)


def sixteen_bit_png(path: Path) -> Path:
    values = np.array([[0, 257], [32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really stored wide
    return path


def test_a_16_bit_png_is_rescaled_for_training_and_refused_by_name_where_exactness_counts(
    tmp_path: Path,
) -> None:
    png = sixteen_bit_png(tmp_path / "wide.png")
    pixels = read_image(png, CONVERT)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 2, 2)
    assert pixels[0].tolist() == [[0, 1], [128, 255]]  # x * 255 / 65535, rounded
    with pytest.raises(ImageReadError, match=r"wide\.png: .* not 8-bit"):
        read_image(png, EXACT)


def test_undecodable_bytes_are_a_named_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    for policy in (CONVERT, EXACT):
        with pytest.raises(ImageReadError, match=r"broken\.png"):
            read_image(bad, policy)


def test_fetched_weights_are_cached_hashed_and_checked(tmp_path: Path) -> None:
    data = b"weights" * 1000
    with fsspec.open("memory://weights/net.pth", "wb") as f:
        f.write(data)
    cache = tmp_path / "cache"
    local, sha = fetch_weights("memory://weights/net.pth", cache)
    assert local.read_bytes() == data and sha == sha256_file(local)
    assert fetch_weights("memory://weights/net.pth", cache) == (local, sha)  # from the cache
    with pytest.raises(WeightsError, match=r"evaluation\.weights: .*net\.pth has sha256"):
        fetch_weights(
            "memory://weights/net.pth", cache, expected_sha256="0" * 64, what="evaluation.weights"
        )
    with pytest.raises(WeightsError, match=r"w: no such file .*nope\.pth"):
        fetch_weights(str(tmp_path / "nope.pth"), cache, what="w")
    with pytest.raises(WeightsError, match=r"memory://weights/gone\.pth not found"):
        fetch_weights("memory://weights/gone.pth", cache)


def test_a_fetch_that_fails_mid_copy_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fsspec.open("memory://weights/big.pth", "wb") as f:
        f.write(b"x" * (1 << 20))
    import shutil

    real = shutil.copyfileobj

    def fail_halfway(src, dst, length=0):  # type: ignore[no-untyped-def]
        dst.write(src.read(1000))
        raise OSError("connection reset")

    monkeypatch.setattr(shutil, "copyfileobj", fail_halfway)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"cannot fetch memory://weights/big\.pth"):
        fetch_weights("memory://weights/big.pth", cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(shutil, "copyfileobj", real)
    local, _ = fetch_weights("memory://weights/big.pth", cache)  # the next try starts clean
    assert local.stat().st_size == 1 << 20
