"""The small-image watermark: payload code, carrier, robustness, false positives, distortion,
keys, PNG provenance, the verify-watermark command and the pipeline stage."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
from diffpipe.flows.cli import main
from PIL import Image
from safetensors.torch import save_file

from diffusion_core import watermark as wm
from diffusion_core.config import (
    DataConfig,
    DetectorConfig,
    PipelineConfig,
    SafetyConfig,
    WatermarkConfig,
    parse_config,
)
from diffusion_core.data import load_dataset
from diffusion_core.io import psnr
from diffusion_core.pipeline.stages.dataset import prepare_dataset
from diffusion_core.pipeline.stages.safety import read_published, safety_filter
from diffusion_core.pipeline.stages.sample import read_tensors
from diffusion_core.pipeline.stages.watermark import watermark_published
from diffusion_core.pipeline.store import ArtefactStore

KEY = wm.WatermarkKey(b"0123456789abcdef-test-key", source="test")
OTHER_KEY = wm.WatermarkKey(b"another-secret-of-enough-bytes", source="other")
PAYLOAD = wm.Payload.for_model("quickstart", 7)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """The quickstart's images: 1,797 handwritten digits at 16x16, uint8 (N, 1, 16, 16)."""
    return load_dataset(DataConfig(kind="digits", image_size=16)).images


def random_rgb(n: int, seed: int, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def recovered(
    images: torch.Tensor, key: wm.WatermarkKey = KEY, strength: float = wm.DEFAULT_STRENGTH
) -> float:
    """Fraction of images whose decoded payload is PAYLOAD."""
    readings = wm.decode(images, key, strength=strength)
    return float(np.mean([r.payload == PAYLOAD for r in readings]))


def bit_accuracy(images: torch.Tensor) -> float:
    bits, _ = wm.read_bits(images, KEY)
    return float((bits == PAYLOAD.to_bits()).mean())


# ----------------------------------------------------------------------------- payload code


def test_crc16_check_value():
    # The catalogued check value of CRC-16/CCITT-FALSE over the ASCII digits 1..9.
    assert wm.crc16(b"123456789") == 0x29B1


def _crc16_bitwise(data: bytes) -> int:
    """CRC-16/CCITT-FALSE from its definition, one bit at a time."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = (((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def test_crc16_matches_its_definition_on_random_inputs():
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, *rng.integers(3, 64, size=200).tolist()]:
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        assert wm.crc16(data) == _crc16_bitwise(data), data.hex()


def test_payload_round_trip_and_every_one_or_two_bit_error_is_detected():
    payload = wm.Payload(0xBEEF, 65535)
    bits = payload.to_bits()
    assert bits.shape == (wm.PAYLOAD_BITS,) and wm.Payload.from_bits(bits) == payload
    assert bits[:16].tolist() == [int(b) for b in f"{0xBEEF:016b}"]
    for i in range(wm.PAYLOAD_BITS):
        for j in range(i, wm.PAYLOAD_BITS):
            corrupt = bits.copy()
            corrupt[[i, j]] ^= 1  # i == j: a single flip
            assert wm.Payload.from_bits(corrupt) is None, (i, j)


def test_payload_rejects_out_of_range_and_names_the_field():
    with pytest.raises(wm.WatermarkError, match="version"):
        wm.Payload.for_model("quickstart", 70000)
    with pytest.raises(wm.WatermarkError, match="'v3'"):
        wm.Payload.for_model("quickstart", "v3")
    assert PAYLOAD.matches_model("quickstart") and not PAYLOAD.matches_model("other")


# ----------------------------------------------------------------------------- carrier


def test_zigzag_is_jpegs_order():
    # The first entries of JPEG's zigzag as natural (row-major) indices (ITU T.81, figure 5).
    natural = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4]
    assert [r * 8 + c for r, c in wm._zigzag(8)[:15]] == natural


@pytest.mark.parametrize("size", [16, 32, 24])
def test_patterns_are_orthonormal_and_live_in_the_low_ac_band(size):
    c = wm.carrier(KEY, size, size)
    p = c.patterns  # (H*W, bits)
    np.testing.assert_allclose(p.T @ p, np.eye(wm.PAYLOAD_BITS), atol=1e-10)
    # An independent block DCT (scipy) of each pattern: energy only at zigzag positions 1..14.
    allowed = np.zeros((8, 8), dtype=bool)
    for r, col in wm._zigzag(8)[1:15]:
        allowed[r, col] = True
    images = p.T.reshape(-1, size // 8, 8, size // 8, 8).transpose(0, 1, 3, 2, 4)
    coeffs = scipy.fft.dctn(images, axes=(-2, -1), norm="ortho")
    assert np.abs(coeffs[..., ~allowed]).max() < 1e-10
    assert c.dither.min() >= 0 and c.dither.max() < c.step
    # The key decides the patterns.
    assert np.abs(wm.carrier(OTHER_KEY, size, size).patterns.T @ p).max() < 0.9


def test_an_empty_batch_is_fine():
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    assert wm.embed(empty, PAYLOAD, KEY).shape == empty.shape and wm.decode(empty, KEY) == []


def test_too_small_images_are_refused_naming_the_size():
    with pytest.raises(wm.WatermarkError, match="8x8 image is too small"):
        wm.embed(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), PAYLOAD, KEY)
    with pytest.raises(wm.WatermarkError, match="uint8"):
        wm.embed(torch.zeros(1, 1, 16, 16), PAYLOAD, KEY)


# ----------------------------------------------------------------------------- robustness


def test_survives_png_and_jpeg_90_on_digits(digits):
    images = digits[:200]
    marked = wm.embed(images, PAYLOAD, KEY)
    png = wm.round_trip(marked)
    assert torch.equal(png, marked) and recovered(png) == 1.0
    # Freshly marked, every correlation sits on its lattice point, step/4 from the boundaries
    # (less the rounding to integers); an unmarked image's bits lie anywhere.
    step = wm.DEFAULT_STRENGTH  # the lattice step at 16x16
    _, margins = wm.read_bits(png, KEY)
    assert margins.max() <= step / 4 and margins.min() > step / 4 - 1.5
    assert wm.read_bits(images, KEY)[1].mean() == pytest.approx(step / 8, rel=0.1)
    jpeg = wm.round_trip(marked, jpeg_quality=90)
    assert not torch.equal(jpeg, marked)
    assert bit_accuracy(jpeg) >= 0.999 and recovered(jpeg) >= 0.98


def test_survives_png_and_jpeg_90_on_random_rgb():
    images = random_rgb(200, seed=1)
    marked = wm.embed(images, PAYLOAD, KEY)
    assert recovered(wm.round_trip(marked)) == 1.0
    jpeg = wm.round_trip(marked, jpeg_quality=90)
    assert bit_accuracy(jpeg) >= 0.999 and recovered(jpeg) >= 0.98


def test_survives_jpeg_90_on_colour_shapes():
    # Saturated colour edges: a colour JPEG is read as its Y plane, before chroma upsampling
    # and the conversion back to RGB clip it.
    images = load_dataset(DataConfig(kind="shapes", image_size=32, num_samples=200)).images
    marked = wm.embed(images, PAYLOAD, KEY)
    jpeg = wm.round_trip(marked, jpeg_quality=90)
    assert jpeg.shape == (200, 1, 32, 32)
    luma = torch.einsum("c,nchw->nhw", torch.tensor(wm.LUMA), marked.double())
    assert (jpeg[:, 0].double() - luma).abs().mean() < 2.0  # the Y plane is the image's luma
    assert bit_accuracy(jpeg) >= 0.999 and recovered(jpeg) >= 0.98


def test_grey_and_rgb_copies_of_an_image_read_alike(digits):
    # RGB with R = G = B has the grey image as its luma: the mark reads the same either way.
    marked = wm.embed(digits[:20], PAYLOAD, KEY)
    assert recovered(marked.repeat(1, 3, 1, 1)) == 1.0


# ----------------------------------------------------------------------------- false positives


def test_unmarked_images_and_wrong_keys_read_as_unmarked(digits):
    gen = torch.Generator().manual_seed(2)
    unmarked = [
        digits,  # 1,797 real digits
        torch.randint(0, 256, (300, 1, 16, 16), dtype=torch.uint8, generator=gen),  # noise
        random_rgb(300, seed=3),
        torch.zeros(1, 1, 16, 16, dtype=torch.uint8),  # blank
        torch.full((1, 3, 32, 32), 255, dtype=torch.uint8),  # saturated
        torch.full((1, 1, 16, 16), 128, dtype=torch.uint8),  # constant
    ]
    readings = [r for batch in unmarked for r in wm.decode(batch, KEY)]
    assert len(readings) >= 2000
    assert sum(r.marked for r in readings) == 0
    # Marked images under another key carry no readable mark either.
    marked = wm.embed(digits[:200], PAYLOAD, KEY)
    assert recovered(marked) == 1.0 and recovered(marked, OTHER_KEY) == 0.0
    assert not any(r.marked for r in wm.decode(marked, OTHER_KEY))
    # ... nor under the right key read with another strength (step).
    assert not any(r.marked for r in wm.decode(marked, KEY, strength=13.0))


# ----------------------------------------------------------------------------- distortion


@pytest.mark.parametrize(("size", "count"), [(16, 400), (32, 200), (20, 300), (128, 12)])
def test_distortion_matches_the_dither_quantiser_closed_form(size, count):
    # Mid-grey images are never clipped: each correlation moves by a uniform error on
    # [-step/2, step/2] with step = strength * sqrt(A / 256) over the A pixels of whole 8x8
    # blocks, so their MSE is bits * step^2 / 12 / A = strength^2 / 64 at every size, plus 1/12
    # from rounding; pixels outside whole blocks are left alone.
    gen = torch.Generator().manual_seed(4)
    images = torch.randint(64, 192, (count, 1, size, size), dtype=torch.uint8, generator=gen)
    marked = wm.embed(images, PAYLOAD, KEY, strength=12.0)
    mse = float(((marked.double() - images.double()) ** 2).mean())
    carried = (size // 8 * 8) ** 2 / size**2
    assert mse == pytest.approx(carried * (12.0**2 / 64 + 1 / 12), rel=0.05)
    assert recovered(wm.round_trip(marked), strength=12.0) == 1.0


def test_psnr_on_the_quickstart_digits(digits):
    images = digits[:200]
    marked = wm.embed(images, PAYLOAD, KEY)
    psnrs = np.array([psnr(a, b) for a, b in zip(images, marked, strict=True)])
    assert psnrs.mean() >= 38.5 and psnrs.min() >= 34.0
    assert psnr(images[0], images[0]) == float("inf")


# ----------------------------------------------------------------------------- keys


def test_key_sources_and_secrecy(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(wm.KEY_ENV, raising=False)
    with pytest.raises(wm.WatermarkError, match=r"watermark\.key does not exist"):
        wm.load_key()
    created = wm.load_key(create=True)
    path = tmp_path / "home" / "watermark.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert wm.load_key().key_id == created.key_id  # the same key on the next run

    secret = "s3cret-value-long-enough"
    monkeypatch.setenv("MY_WM_KEY", secret)
    from_env = wm.load_key(key_env="MY_WM_KEY")
    assert from_env.key_id != created.key_id
    assert secret not in repr(from_env) and secret not in from_env.key_id

    (tmp_path / "short").write_text("tiny")
    with pytest.raises(wm.WatermarkError, match="short: a watermark key needs") as info:
        wm.load_key(key_file=tmp_path / "short")
    assert "tiny" not in str(info.value)
    with pytest.raises(wm.WatermarkError, match="missing"):
        wm.load_key(key_file=tmp_path / "missing")


def test_config_section():
    cfg = parse_config({"pipeline": {"watermark": {"enabled": True, "key_file": "/k"}}})
    assert cfg.pipeline.watermark.enabled and cfg.pipeline.watermark.key_file == "/k"
    assert WatermarkConfig().strength == wm.DEFAULT_STRENGTH
    assert not PipelineConfig().watermark.enabled
    with pytest.raises(ValueError, match=r"pipeline\.watermark\.key'"):
        parse_config({"pipeline": {"watermark": {"key": "literal"}}})


# ----------------------------------------------------------------------------- PNG + CLI


def write_marked_png(path: Path, image: torch.Tensor, key: wm.WatermarkKey = KEY) -> None:
    marked = wm.embed(image[None], PAYLOAD, key)[0]
    wm.save_png(marked, path, wm.Provenance("quickstart", "7", "run-abc", key.key_id))


def test_png_provenance_round_trip(tmp_path, digits):
    write_marked_png(tmp_path / "a.png", digits[0])
    meta = wm.read_png_provenance(tmp_path / "a.png")
    assert meta == wm.Provenance("quickstart", "7", "run-abc", KEY.key_id, wm.SCHEME)
    Image.new("L", (16, 16)).save(tmp_path / "plain.png")
    assert wm.read_png_provenance(tmp_path / "plain.png") is None


def test_verify_watermark_exit_codes(tmp_path, digits, capsys):
    key_file = tmp_path / "key"
    key_file.write_bytes(b"0123456789abcdef-test-key")
    other = tmp_path / "other-key"
    other.write_bytes(b"another-secret-of-enough-bytes")
    marked, plain, jpeg = tmp_path / "marked.png", tmp_path / "plain.png", tmp_path / "m.jpg"
    write_marked_png(marked, digits[3])
    wm.save_png(digits[3], plain, wm.Provenance("quickstart", "7", "run-abc", KEY.key_id))
    Image.open(marked).save(jpeg, quality=90)
    verify = ["verify-watermark", "--key-file", str(key_file)]

    assert main([*verify, str(marked), str(jpeg)]) == 0
    out = capsys.readouterr().out
    assert f"marked: model tag {wm.model_tag('quickstart'):04x}, version 7" in out
    assert "PNG metadata: model quickstart v7, run run-abc" in out
    assert out.count("marked: model tag") == 2  # the JPEG too

    # A PNG whose metadata claims a mark its pixels do not hold is not marked.
    assert main([*verify, str(marked), str(plain)]) == 1
    assert f"{plain}: not marked" in capsys.readouterr().out
    assert main(["verify-watermark", "--key-file", str(other), str(marked)]) == 1
    assert "the metadata names key id" in capsys.readouterr().out

    (tmp_path / "junk.png").write_text("not an image")
    assert main([*verify, str(marked), str(tmp_path / "junk.png")]) == 2
    assert "junk.png: cannot read image" in capsys.readouterr().err
    assert main([*verify, str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    Image.new("L", (8, 8)).save(tmp_path / "tiny.png")
    assert main([*verify, str(tmp_path / "tiny.png")]) == 2
    assert main(["verify-watermark", "--key-file", str(tmp_path / "nokey"), str(marked)]) == 2


# ----------------------------------------------------------------------------- pipeline stage


def test_stage_marks_published_images_only(tmp_path, monkeypatch, caplog, digits):
    secret = "stage-secret-key-0123456789"
    monkeypatch.setenv("STAGE_WM_KEY", secret)
    store = ArtefactStore(f"file://{tmp_path / 'store'}")
    dataset = prepare_dataset(DataConfig(kind="digits", image_size=16), store)
    # One shard: ten digits and two blank images (which the sanity detector quarantines).
    images = torch.cat([digits[-10:], torch.zeros(2, 1, 16, 16, dtype=torch.uint8)])
    shard = tmp_path / "shard"
    shard.mkdir()
    save_file(
        {"images": images, "labels": torch.arange(12) % 10, "seeds": torch.arange(12)},
        shard / "images.safetensors",
    )
    store.put_dir("runs/r1/samples/shard-00000", shard)
    chain = SafetyConfig(detectors=[DetectorConfig(name="sanity")])
    safety = safety_filter(
        store, ["runs/r1/samples/shard-00000"], dataset, out_prefix="runs/r1/safety", safety=chain
    )
    assert (safety.published, safety.quarantined) == (10, 2)
    before = store.read_manifest("runs/r1/safety")["files"]

    cfg = WatermarkConfig(enabled=True, key_env="STAGE_WM_KEY")
    commits: list[str] = []  # the marked images go up as one directory, in one batched put_dir
    put_dir = store.put_dir
    monkeypatch.setattr(store, "put_dir", lambda p, d: commits.append(p) or put_dir(p, d))
    with caplog.at_level(logging.DEBUG):
        ref = watermark_published(
            store,
            safety,
            out_prefix="runs/r1/published",
            model_name="quickstart",
            model_version="7",
            run_id="r1",
            cfg=cfg,
        )
    key = wm.load_key(key_env="STAGE_WM_KEY")
    assert (ref.marked, ref.key_id, ref.model_version) == (10, key.key_id, "7")
    assert ref.psnr_min is not None and ref.psnr_min > 30
    assert ref.safety == dataclasses.replace(safety, prefix="runs/r1/published")
    assert commits == ["runs/r1/published"]
    assert len(store.read_manifest("runs/r1/published")["files"]) == 10 + 2  # + tensors, record

    # What reads the published set next gets the marked images, labels and seeds kept.
    published = read_published(store, ref.safety.prefix)
    assert all(r.payload == PAYLOAD for r in wm.decode(published["images"], key))
    assert torch.equal(published["labels"], torch.arange(10))
    assert 0 < psnr(images[:10], published["images"]) < float("inf")
    # The filter's own output is untouched, byte for byte; quarantined images carry no mark.
    assert store.read_manifest("runs/r1/safety")["files"] == before
    quarantine = read_tensors(store, "runs/r1/safety", "quarantine/images.safetensors")
    assert torch.equal(quarantine["images"], images[10:])
    assert not any(r.marked for r in wm.decode(quarantine["images"], key))

    local = tmp_path / "fetched"
    store.get_dir("runs/r1/published", local)
    pngs = sorted(local.glob("*.png"))
    assert len(pngs) == 10
    assert wm.read_png_provenance(pngs[4]) == wm.Provenance("quickstart", "7", "r1", key.key_id)
    assert torch.equal(wm.load_image(pngs[4])[0], published["images"][4])
    assert json.loads((local / "watermark.json").read_text())["ref"]["marked"] == 10

    # Safe to re-run: the committed record comes back, nothing is rewritten.
    committed = store.read_manifest("runs/r1/published")
    again = watermark_published(
        store,
        safety,
        out_prefix="runs/r1/published",
        model_name="quickstart",
        model_version="7",
        run_id="r1",
        cfg=cfg,
    )
    assert again == ref and store.read_manifest("runs/r1/published") == committed
    # The key never reaches the logs or the store.
    assert secret not in caplog.text
    assert all(secret.encode() not in p.read_bytes() for p in local.rglob("*") if p.is_file())
    assert os.environ["STAGE_WM_KEY"] == secret
