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
