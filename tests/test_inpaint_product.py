"""Inpainting as a product: the CLI on one image and on folders, from a checkpoint or the MLflow
registry (SQLite in a temp dir), and the registered pyfunc; the known region is exact."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from diffpipe.flows.cli import main
from PIL import Image

from diffusion_core import io as dio
from diffusion_core.model import latest_checkpoint
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--steps", "3", "--resample", "2", "--jump-length", "2"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A tiny trained checkpoint, registered as tiny v1 (challenger and champion) in MLflow on
    SQLite; MLFLOW_TRACKING_URI points there for the module."""
    from diffpipe.tasks import tracking

    root = tmp_path_factory.mktemp("registry")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY | {"train": TINY["train"] | {"steps": 2}}))
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    checkpoint = latest_checkpoint(root / "run" / "checkpoints")
    assert checkpoint is not None
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)  # for mlflow.pyfunc.load_model, as a user would
    run_id = tracking.start_run(
        uri, "inpaint-test", f"file://{root / 'artefacts'}", run_name="register", params={}, tags={}
    )
    model = tracking.register_model(uri, run_id, name="tiny", checkpoint_dir=checkpoint, tags={})
    tracking.set_champion(uri, "tiny", model.version)
    tracking.end_run(uri, run_id, "FINISHED")
    yield checkpoint
    mlflow.set_tracking_uri(None)
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def test_load_time_options_reach_the_registered_model(registry):
    """The version's default sampling (a sweep's choice in ``diffpipe.sampling``) and the load
    options pass through ``model_config`` to the model."""
    import json

    from diffpipe.tasks import tracking

    uri = os.environ["MLFLOW_TRACKING_URI"]
    plain = tracking.load_registered("models:/tiny/1").unwrap_python_model()
    assert plain.card.sampling.steps == TINY["sample"]["steps"] and plain.max_samples > 7
    sampling = plain.card.sampling.model_copy(update={"sampler": "ddpm", "steps": 7})
    client = mlflow.MlflowClient(uri, uri)
    client.set_model_version_tag("tiny", "1", "diffpipe.sampling", sampling.model_dump_json())
    try:
        loaded = tracking.load_registered("models:/tiny@champion", max_samples=7)
        model = loaded.unwrap_python_model()
        assert (model.card.sampling.sampler, model.card.sampling.steps) == ("ddpm", 7)
        assert model.max_samples == 7
        with pytest.raises(Exception, match="7"):
            loaded.predict({"num_samples": 8})
    finally:
        client.delete_model_version_tag("tiny", "1", "diffpipe.sampling")
    assert json.loads(sampling.model_dump_json())["steps"] == 7


def digit(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)


def half_mask(col: int = 4) -> np.ndarray:
    m = np.full((8, 8), 255, np.uint8)
    m[:, col:] = 0
    return m


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("model", ["models:/tiny@champion", "models:/tiny/1", "checkpoint"])
def test_cli_single_image_known_region_exact(registry, tmp_path, model):
    image = save(tmp_path / "damaged.png", digit(0))
    mask = save(tmp_path / "mask.png", half_mask())
    out = tmp_path / "out.png"
    source = str(registry) if model == "checkpoint" else model
    args = [
        "inpaint",
        "--model",
        source,
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--num",
        "2",
        "--scale",
        "1",
        "--out",
        str(out),
        *FAST,
    ]
    assert main(args) == 0
    grid = np.asarray(Image.open(out))
    for col in (1, 10):  # two completions, 1-pixel borders
        assert np.array_equal(grid[1:9, col : col + 4], digit(0)[:, :4])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_unknown_registered_model_exits_2(registry, tmp_path, capsys):
    image = save(tmp_path / "a.png", digit(0))
    args = [
        "inpaint",
        "--model",
        "models:/tiny@nobody",
        "--image",
        str(image),
        "--mask",
        str(image),
        "--out",
        str(tmp_path / "o.png"),
    ]
    assert main(args) == 2
    assert "models:/tiny@nobody" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_batch_masks_by_name_and_one_for_all(registry, tmp_path):
    images = {f"{name}.png": digit(i) for i, name in enumerate(["a", "b", "c"])}
    masks = {"a.png": half_mask(2), "b.png": half_mask(4), "c.png": half_mask(6)}
    for name, arr in images.items():
        save(tmp_path / "in" / name, arr)
        save(tmp_path / "masks" / name, masks[name])
    out = tmp_path / "out"
    args = [
        "inpaint",
        "--checkpoint",
        str(registry),
        "--image",
        str(tmp_path / "in"),
        "--mask",
        str(tmp_path / "masks"),
        "--out",
        str(out),
        *FAST,
    ]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    for name, arr in images.items():
        filled = np.asarray(Image.open(out / name))
        assert filled.shape == (8, 8)
        known = masks[name] == 255
        assert np.array_equal(filled[known], arr[known])

    one = save(tmp_path / "one-mask.png", half_mask(3))
    out2 = tmp_path / "out2"
    args = [
        "inpaint",
        "--model",
        str(registry),
        "--image",
        str(tmp_path / "in"),
        "--mask",
        str(one),
        "--num",
        "2",
        "--out",
        str(out2),
        *FAST,
    ]
    assert main(args) == 0
    names = sorted(p.name for p in out2.iterdir())
    assert names == ["a-0.png", "a-1.png", "b-0.png", "b-1.png", "c-0.png", "c-1.png"]
    for name in names:
        filled = np.asarray(Image.open(out2 / name))
        assert np.array_equal(filled[:, :3], images[name[0] + ".png"][:, :3])


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    """Named cases: (image folder, mask, the file the message must name)."""
    cases = {}
    for case in ("missing_mask", "image_size", "mask_size", "unreadable", "colour", "alpha"):
        d = tmp / case
        save(d / "in" / "a.png", digit(0))
        save(d / "masks" / "a.png", half_mask())
        cases[case] = (d / "in", d / "masks", str(d / "in" / "b.png"))
        save(d / "masks" / "b.png", half_mask())
    save(tmp / "missing_mask" / "in" / "b.png", digit(1))
    (tmp / "missing_mask" / "masks" / "b.png").unlink()
    save(tmp / "image_size" / "in" / "b.png", np.zeros((10, 10), np.uint8))
    save(tmp / "mask_size" / "in" / "b.png", digit(1))
    save(tmp / "mask_size" / "masks" / "b.png", np.zeros((4, 4), np.uint8))
    d = tmp / "mask_size"
    cases["mask_size"] = (d / "in", d / "masks", str(d / "masks" / "b.png"))
    (tmp / "unreadable" / "in" / "b.png").write_bytes(b"not a png")
    rgb = np.stack([digit(1), digit(2), digit(3)], axis=-1)
    save(tmp / "colour" / "in" / "b.png", rgb)
    rgba = np.dstack([digit(1)] * 3 + [np.full((8, 8), 100, np.uint8)])
    save(tmp / "alpha" / "in" / "b.png", rgba)
    return cases


def test_cli_batch_bad_inputs_exit_2_naming_the_file(registry, tmp_path, capsys):
    for case, (images, masks, named) in _bad_inputs(tmp_path).items():
        out = tmp_path / case / "out"
        args = [
            "inpaint",
            "--checkpoint",
            str(registry),
            "--image",
            str(images),
            "--mask",
            str(masks),
            "--out",
            str(out),
            *FAST,
        ]
        assert main(args) == 2, case
        err = capsys.readouterr().err
        assert named in err, (case, err)
        assert not out.exists(), case


def test_cli_output_kind_must_match_input_kind(registry, tmp_path, capsys):
    image = save(tmp_path / "in" / "a.png", digit(0))
    mask = save(tmp_path / "mask.png", half_mask())
    base = ["inpaint", "--checkpoint", str(registry), "--mask", str(mask), *FAST]
    assert main([*base, "--image", str(image), "--out", str(tmp_path / "out")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main([*base, "--image", str(image.parent), "--out", str(tmp_path / "o.png")]) == 2
    assert "folder" in capsys.readouterr().err


def test_batch_failure_leaves_nothing_half_written(registry, tmp_path, monkeypatch, capsys):
    for i, name in enumerate("abc"):
        save(tmp_path / "in" / f"{name}.png", digit(i))
    mask = save(tmp_path / "mask.png", half_mask())
    out = tmp_path / "out"
    save(out / "a.png", np.zeros((8, 8), np.uint8))  # a previous result stays as it was
    real_to_pil, calls = dio.to_pil, []

    def fail_on_third(image):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_to_pil(image)

    monkeypatch.setattr(dio, "to_pil", fail_on_third)
    monkeypatch.setenv("DIFFPIPE_HOME", str(tmp_path.with_name(tmp_path.name + "-home")))
    args = [
        "inpaint",
        "--checkpoint",
        str(registry),
        "--image",
        str(tmp_path / "in"),
        "--mask",
        str(mask),
        "--out",
        str(out),
        *FAST,
    ]
    assert main(args) == 1  # a failed run, not bad input: a message, the traceback in a log
    err = capsys.readouterr().err
    assert "failed: OSError: disk full" in err and "Traceback" not in err
    log = Path(err.rsplit("the traceback: ", 1)[1].strip())
    assert "Traceback" in log.read_text() and "OSError: disk full" in log.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    assert not np.asarray(Image.open(out / "a.png")).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "mask.png", "out"]


# -------------------------------------------------------------------------------------- pyfunc


def test_pyfunc_inpainting_request(registry):
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    images = np.stack([digit(0), digit(1)])[..., None]  # (2, 8, 8, 1)
    masks = np.stack([half_mask(2), half_mask(5)])  # (2, 8, 8)
    out = model.predict(
        {"image": images, "mask": masks, "steps": 3, "resample": 2, "jump_length": 2, "seed": 1}
    )
    assert out.shape == (2, 8, 8, 1) and out.dtype == np.uint8
    for i in range(2):
        known = masks[i] == 255
        assert np.array_equal(out[i, ..., 0][known], images[i, ..., 0][known])
    # One image, k completions, one mask as booleans; RePaint with r = 1 is plain replacement.
    three = model.predict(
        {
            "image": digit(4),
            "mask": half_mask(3) == 255,
            "num_samples": 3,
            "steps": 2,
            "resample": 1,
            "labels": [7],
        }
    )
    assert three.shape == (3, 8, 8, 1)
    assert (three[:, :, :3, 0] == digit(4)[:, :3]).all()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"image": "IMG"}, "both 'image' and 'mask'"),
        ({"image": "IMG", "mask": "MASK", "sampler": "ddim"}, "do not apply to inpainting"),
        ({"image": np.zeros((4, 4), np.uint8), "mask": "MASK"}, "'image' must be"),
        ({"image": "IMG", "mask": np.ones((2, 2))}, "'mask' must be"),
        ({"image": np.zeros((8, 8)) + 0.5, "mask": "MASK"}, "integers in \\[0, 255\\]"),
        (
            {"image": "IMG", "mask": "MASK", "num_samples": 0},
            r"num_samples\s.*greater than or equal to 1",
        ),
    ],
)
def test_pyfunc_inpainting_bad_requests(registry, request_, message):
    model = mlflow.pyfunc.load_model("models:/tiny/1")
    fill = {"IMG": digit(0), "MASK": half_mask()}
    req = {k: fill[v] if isinstance(v, str) and v in fill else v for k, v in request_.items()}
    with pytest.raises(Exception, match=message):
        model.predict(req)


def test_run_summary_prints_inpainting_rows(capsys):
    import argparse

    from diffpipe.flows.runs import _finish

    summary = {
        "model": {"name": "m", "version": "2", "aliases": []},
        "inpainting": [{"mask": "half", "method": "repaint", "psnr": 11.974, "seam_ratio": 1.1888}],
    }
    _finish(summary, argparse.Namespace(summary_out=None))
    assert "inpainting half/repaint: PSNR 11.97 dB, seam/real 1.189" in capsys.readouterr().out
