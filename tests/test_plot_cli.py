"""``diffpipe plot noise`` and ``diffpipe plot schedules``: the report's figures from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from diffpipe.flows.cli import main
from PIL import Image


def _image(path: Path, size: int = 16, rgb: bool = False) -> Path:
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if rgb else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_plot_noise_default_and_given_steps(tmp_path, capsys):
    image = _image(tmp_path / "digit.png")
    out = tmp_path / "noise.png"
    assert main(["plot", "noise", "--image", str(image), "--out", str(out)]) == 0
    assert "t = 0, 50, 100, 250, 500, 750, 999 (linear)" in capsys.readouterr().out
    wide_w, wide_h = _png_size(out)
    few = tmp_path / "few.png"
    args = [
        "plot",
        "noise",
        "--image",
        str(image),
        str(_image(tmp_path / "b.png")),
        "--steps",
        "0,500",
        "--schedule",
        "cosine",
        "--out",
        str(few),
    ]
    assert main(args) == 0
    few_w, few_h = _png_size(few)
    # Columns are timesteps and rows images: 7 columns vs 2, one row vs 2.
    assert 200 < few_w < wide_w and wide_h < few_h
    assert wide_w > 7 * 64


def test_plot_noise_takes_schedule_from_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"diffusion": {"schedule": "cosine", "num_steps": 200}}))
    out = tmp_path / "noise.png"
    image = _image(tmp_path / "rgb.png", rgb=True)
    assert (
        main(["plot", "noise", "--image", str(image), "--config", str(config), "--out", str(out)])
        == 0
    )
    assert "t = 0, 10, 20, 50, 100, 150, 199 (cosine)" in capsys.readouterr().out
    assert out.is_file()


def test_plot_schedules(tmp_path):
    out = tmp_path / "figs" / "schedules.png"
    assert main(["plot", "schedules", "--out", str(out)]) == 0
    width, height = _png_size(out)
    assert width > 800 and 250 < height < width
    three = tmp_path / "three.png"
    assert (
        main(
            [
                "plot",
                "schedules",
                "--schedules",
                "linear,cosine,sigmoid",
                "--num-steps",
                "500",
                "--out",
                str(three),
            ]
        )
        == 0
    )
    assert three.is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0,fifty"], "comma-separated integers"),
        (["--steps", "0,1000"], "[0, 999]"),
        (["--steps", ","], "[0, 999]"),
        (["--steps", "-1"], "[0, 999]"),
        (["--num-steps", "1"], "at least 2"),
    ],
)
def test_plot_noise_bad_steps_exit_2(tmp_path, capsys, extra, message):
    image = _image(tmp_path / "d.png")
    out = tmp_path / "noise.png"
    assert main(["plot", "noise", "--image", str(image), *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_plot_bad_inputs_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere.png"
    assert main(["plot", "noise", "--image", str(missing), "--out", str(tmp_path / "n.png")]) == 2
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["plot", "noise", "--image", str(bad), "--out", str(tmp_path / "n.png")]) == 2
    assert str(bad) in capsys.readouterr().err
    a, b = _image(tmp_path / "a.png", 16), _image(tmp_path / "b.png", 8)
    assert main(["plot", "noise", "--image", str(a), str(b), "--out", str(tmp_path / "n.png")]) == 2
    assert str(b) in capsys.readouterr().err
    assert (
        main(
            ["plot", "schedules", "--schedules", "linear,square", "--out", str(tmp_path / "s.png")]
        )
        == 2
    )
    assert "'linear,square'" in capsys.readouterr().err
    assert main(["plot", "schedules", "--out", str(tmp_path / "s.jpg")]) == 2
    assert "s.jpg" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "bad.png"]
