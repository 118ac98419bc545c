"""Property tests (Hypothesis): whatever a user, or an attacker, feeds in (random YAML and keys
to the config loader and ``--set``, random bytes as images, captions files, masks, checkpoints
and watermark inputs) ends in a result or in a clear error naming the input (exit 2 at the
command line), never a traceback or an unhandled exception."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from diffpipe.flows.cli import main
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion_core.config import RunConfig
from tests.conftest import TINY

FAST = settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "40")),
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def cwd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFPIPE_HOME", str(tmp_path / "home"))
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``diffpipe ARGS`` in-process: the exit code and what went to stderr (argparse exits by
    itself, with its usage and ``diffpipe COMMAND: error: ...``, on arguments it cannot parse)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_message(code: int, err: str, *, named: str | None = None) -> None:
    """A bad input: exit 2, one ``diffpipe ...: error`` message (naming ``named``), no traceback
    and no crash log."""
    assert code == 2, err
    assert err.startswith("diffpipe: error") or "\ndiffpipe train: error: " in err, err
    assert "Traceback" not in err and "full log" not in err, err
    if named is not None:
        assert named in err, err


# ----------------------------------------------------------------------------------------------
# Configs and --set.

SECTIONS = {name: field.annotation for name, field in RunConfig.model_fields.items()}
KEYS = sorted(
    {
        *SECTIONS,
        *(
            f"{section}.{key}"
            for section, annotation in SECTIONS.items()
            for key in getattr(annotation, "model_fields", {})
        ),
    }
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=10),
    st.dates(),
    st.sampled_from(["../../x", "/abs", "a/b", "a:b", "models:/x/1", "", "Ωmega", "1e400"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 3}`` -> ``{"train": {"steps": 3}}`` (later keys win over clashes)."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    return out


configs = st.one_of(
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), values, max_size=6).map(nest),
    values,
)
documents = st.one_of(
    configs.map(lambda c: yaml.safe_dump(c, allow_unicode=True)),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


@FAST
@given(text=documents)
@example(text="")
@example(text="name: &n [*n]")
@example(text="safety: {detectors: [{name: sanity, params: &p {x: *p}}]}")
@example(text="a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n")
@example(text="train: {steps: .inf, lr: .nan}")
@example(text="train: {steps: true}")
@example(text="name: ../../escape")
@example(text="[" * 5000)
def test_any_yaml_file_is_a_config_or_a_message_naming_it(
    cwd_home: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = cwd_home / "random.yaml"
    path.write_text(text, errors="surrogateescape")
    code, err = cli(capsys, "train", "--config", str(path), "--dry-run")
    if code != 0:
        assert_message(code, err, named=str(path))


set_keys = st.lists(
    st.sampled_from([k.split(".")[-1] for k in KEYS] + list(SECTIONS))
    | st.text(alphabet=string.printable, max_size=6),
    max_size=4,
).map(".".join)
set_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["[1, 2", "{a: ", ".inf", "-1", "1e999", "&a [*a]", "!!python/object:os.system"]
    ),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)


@FAST
@given(keys=st.lists(st.tuples(set_keys, set_values, st.booleans()), min_size=1, max_size=3))
@example(keys=[("name.x", "1", True)])
@example(keys=[("train.steps", "[" * 3000, True)])
@example(keys=[("safety.detectors", "[{name: sanity, params: &p {x: *p}}]", True)])
@example(keys=[("train.steps", "[1, 2", True)])
@example(keys=[("pipeline.model_name", "a/b:c", True)])
@example(keys=[("train", "3", True), ("train.steps", "4", True)])
def test_any_set_is_applied_or_a_message(
    cwd_home: Path, capsys: pytest.CaptureFixture[str], keys: list[tuple[str, str, bool]]
) -> None:
    config = cwd_home / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["train", "--config", str(config), "--dry-run"]
    for key, value, with_sign in keys:
        args += ["--set", f"{key}={value}" if with_sign else key + value]
    code, err = cli(capsys, *args)
    if code != 0:
        assert_message(code, err)


# ----------------------------------------------------------------------------------------------
# Images, masks and captions.


def png(size: int = 8, mode: str = "L") -> bytes:
    channels = 3 if mode == "RGB" else 1
    pixels = np.arange(size * size * channels, dtype=np.uint8).reshape(size, size, channels)
    out = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(out, format="PNG")
    return out.getvalue()


def mutated(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with some bytes changed, cut short, or followed by junk."""

    @st.composite
    def strategy(draw: st.DrawFn) -> bytes:
        data = bytearray(base)
        for _ in range(draw(st.integers(0, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(data)))
        return bytes(data[:cut]) + draw(st.binary(max_size=16))

    return strategy()


image_bytes = st.one_of(st.binary(max_size=300), mutated(png()), mutated(png(mode="RGB")))


@FAST
@given(blob=image_bytes, size=st.sampled_from([None, 8, 5]))
def test_any_bytes_as_an_image_or_a_mask_are_read_or_named(
    tmp_path: Path, blob: bytes, size: int | None
) -> None:
    from diffusion_core.io import CONVERT, ImageReadError, read_image, read_mask

    path = tmp_path / "input.png"
    path.write_bytes(blob)
    for read in (lambda: read_image(path, CONVERT.sized(size)), lambda: read_mask(path, size)):
        try:
            out = read()
        except ImageReadError as exc:
            assert str(path) in str(exc)
        else:
            assert out.ndim in (3, 4)


captions = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=5).map(
        lambda rows: "file,caption\n" + "".join(f"{a},{b}\n" for a, b in rows)
    ),
    st.lists(values, max_size=4).map(
        lambda rows: "\n".join(json.dumps(r, default=str) for r in rows)
    ),
)


@FAST
@given(content=captions, name=st.sampled_from(["captions.csv", "captions.jsonl"]))
@example(content="file,caption\n" + "x" * 200_000 + ",big\n", name="captions.csv")
@example(content="file,caption\none.png,a\0b\n", name="captions.csv")
@example(content='{"file": "../one.png", "caption": "x"}', name="captions.jsonl")
def test_any_captions_file_is_read_or_named(
    tmp_path: Path, content: str | bytes, name: str
) -> None:
    from diffusion_core.config import DataConfig
    from diffusion_core.data import DatasetError, load_dataset

    root = tmp_path / "data"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    (root / "one.png").write_bytes(png())
    target = root / name
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, errors="surrogateescape")
    try:
        ds = load_dataset(DataConfig(kind="folder", root=str(root), image_size=8))
    except DatasetError as exc:
        assert name in str(exc)
    else:
        assert ds.captions is not None and len(ds.captions) == 1


# ----------------------------------------------------------------------------------------------
# Checkpoints and watermark inputs.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from diffusion_core.config import parse_config
    from diffusion_core.data import load_dataset
    from diffusion_core.training import train

    cfg = parse_config(copy.deepcopy(TINY) | {"train": TINY["train"] | {"steps": 1}})
    out = tmp_path_factory.mktemp("trained")
    result = train(cfg, load_dataset(cfg.data), out, progress=False)
    yield result.checkpoint


class Exploit:
    """A pickle that would run a command when loaded."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


CHECKPOINT_FILES = ["state.pt", "card.json", "weights.safetensors", "ema.safetensors"]


@FAST
@given(name=st.sampled_from(CHECKPOINT_FILES), blob=st.binary(max_size=400))
@example(name="state.pt", blob=pickle.dumps(Exploit()))
@example(name="card.json", blob=b'{"model": {"base_channels": 1e999}}')
@example(name="card.json", blob=b"[]")
def test_any_bytes_in_a_checkpoint_file_are_named(
    cwd_home: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path, name: str, blob: bytes
) -> None:
    """Sampling from a checkpoint (card, EMA weights) or resuming its training (state, weights)
    with one file replaced by random bytes: exit 2 naming that file."""
    from diffusion_core.model import read_state

    broken = cwd_home / "ckpt"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(checkpoint, broken)
    (broken / name).write_bytes(blob)
    if name == "state.pt":
        with pytest.raises(ValueError, match=str(broken / name)):
            read_state(broken / name)
        return
    use = "ema.safetensors" if name != "weights.safetensors" else None
    if use is None:  # the training weights: only resuming reads them
        from diffusion_core.model import read_weights

        with pytest.raises(ValueError, match=str(broken / name)):
            read_weights(broken / name)
        return
    out = cwd_home / "grid.png"
    code, err = cli(
        capsys,
        "sample",
        "--checkpoint",
        str(broken),
        "--num",
        "1",
        "--steps",
        "1",
        "--out",
        str(out),
    )
    assert_message(code, err, named=str(broken / name))


@FAST
@given(blob=image_bytes, key=st.binary(max_size=64))
@example(blob=png(), key=b"k" * 32)  # an image too small to carry a mark
def test_any_bytes_as_a_watermarked_image_or_key_are_named(
    cwd_home: Path, capsys: pytest.CaptureFixture[str], blob: bytes, key: bytes
) -> None:
    image, key_file = cwd_home / "published.png", cwd_home / "watermark.key"
    image.write_bytes(blob)
    key_file.write_bytes(key)
    code, err = cli(capsys, "verify-watermark", str(image), "--key-file", str(key_file))
    if code == 2:
        assert_message(code, err)
        assert str(image) in err or str(key_file) in err, err
    else:
        assert code in (0, 1) and "Traceback" not in err, err
