from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from diffpipe.flows.cli import main
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_help_explains_commands():
    out = subprocess.run(
        [sys.executable, "-m", "diffpipe.flows.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0
    for word in ("train", "sample", "inpaint", "Exit codes"):
        assert word in out.stdout


def test_unknown_config_key_exits_2_naming_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"stepz": 1}}))
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and str(bad) in err


def test_bad_override_and_missing_checkpoint_exit_2(tmp_path, tiny_config_file, capsys):
    assert main(["train", "--config", str(tiny_config_file), "--set", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "none"), "--out", "x.png"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_missing_dataset_root_exits_2(tmp_path, tiny_config_file, capsys):
    code = main(
        [
            "train",
            "--config",
            str(tiny_config_file),
            "--set",
            "data.kind=mnist",
            "--set",
            f"data.root={tmp_path / 'nowhere'}",
        ]
    )
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(tiny_config_file, capsys):
    assert (
        main(["train", "--config", str(tiny_config_file), "--dry-run", "--set", "train.steps=3"])
        == 0
    )
    out = capsys.readouterr().out
    assert '"steps": 3' in out and '"schedule": "linear"' in out


def test_train_sample_inpaint_end_to_end(tmp_path, tiny_config_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_config_file), "--out", str(out), "--quiet"]) == 0
    ckpt = out / "checkpoints"
    grid = tmp_path / "grid.png"
    assert (
        main(
            ["sample", "--checkpoint", str(ckpt), "--num", "10", "--out", str(grid), "--scale", "1"]
        )
        == 0
    )
    assert Image.open(grid).size[0] > 8
    folder = tmp_path / "pngs"
    assert main(["sample", "--checkpoint", str(ckpt), "--labels", "1,2", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png"]
    assert main(["sample", "--checkpoint", str(ckpt), "--labels", "42", "--out", str(grid)]) == 2
    assert "out of range" in capsys.readouterr().err

    image = tmp_path / "digit.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    m = np.full((8, 8), 255, np.uint8)
    m[:, 4:] = 0
    Image.fromarray(m).save(mask)
    filled = tmp_path / "filled.png"
    args = [
        "inpaint",
        "--checkpoint",
        str(ckpt),
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--num",
        "2",
        "--steps",
        "4",
        "--resample",
        "2",
        "--jump-length",
        "2",
        "--out",
        str(filled),
        "--scale",
        "1",
    ]
    assert main(args) == 0
    grid_px = np.asarray(Image.open(filled))
    # The grid has a 1-pixel border; the left half of each completion is the original image.
    left = grid_px[1:9, 1:5]
    assert np.array_equal(left, np.asarray(Image.open(image))[:, :4])


@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_inpaint_unreadable_input_exits_2(tmp_path, tiny_config_file, flag, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(tiny_config_file),
                "--out",
                str(out),
                "--quiet",
                "--set",
                "train.steps=1",
            ]
        )
        == 0
    )
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = {"--image": good, "--mask": good, flag: bad}
    ckpt = str(out / "checkpoints")
    code = main(
        [
            "inpaint",
            "--checkpoint",
            ckpt,
            "--image",
            str(paths["--image"]),
            "--mask",
            str(paths["--mask"]),
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    assert code == 2
    assert "bad.png" in capsys.readouterr().err


def test_sample_out_must_be_a_png_or_a_folder_and_num_positive(tmp_path, capsys):
    jpg = tmp_path / "x.jpg"
    ckpt = str(tmp_path / "none")
    assert main(["sample", "--checkpoint", ckpt, "--out", str(jpg)]) == 2
    assert "--out" in capsys.readouterr().err and not jpg.exists()  # no folder named x.jpg
    assert main(["sample", "--checkpoint", ckpt, "--num", "-1", "--out", "x.png"]) == 2
    assert "--num must be at least 1, got -1" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", ckpt, "--steps", "0", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffpipe: error: SampleRequest: steps:") and err[-1:] == "\n"
    assert err.count("\n") == 1  # one line, not pydantic's multi-line report


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    side = 20_000  # 4e8 pixels, over twice Pillow's limit; the file is a few hundred bytes
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1) * 4))
        + chunk(b"IEND", b"")
    )
    monkeypatch.setenv("DIFFPIPE_WATERMARK_KEY", "a key long enough for the watermark")
    assert main(["verify-watermark", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert str(bomb) in err and "decompression bomb" in err and "Traceback" not in err


def test_a_run_that_fails_late_exits_1_not_2(capsys):
    from diffpipe.flows.cli import _report

    from diffusion_core.config import ConfigError
    from diffusion_core.pipeline.errors import RunFailed

    late = ValueError("runs/r/safety: 0 published samples, too few to evaluate (at least 4)")
    assert _report(RunFailed("evaluate", late)) == 1
    assert "run failed in step evaluate: runs/r/safety: 0 published" in capsys.readouterr().err
    assert _report(RunFailed("prepare_dataset", ConfigError("x.yaml: key 'a'"))) == 2
    assert "error in step prepare_dataset: x.yaml" in capsys.readouterr().err
