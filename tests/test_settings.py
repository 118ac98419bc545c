"""The settings object: every environment variable diffpipe reads, read when used, with errors
that name the variable and its value."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_core.config import diffpipe_home
from diffusion_core.pipeline.s3 import s3_storage_options
from diffusion_core.settings import MAX_RETRIES, SettingsError, settings


def test_defaults_and_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DIFFPIPE_HOME", "DIFFPIPE_RETRY_DELAYS", "AWS_ENDPOINT_URL", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")
    s = settings()
    assert s.diffpipe_home == Path(".diffpipe") and s.retry_delays == (2.0, 8.0)
    assert s.aws_endpoint_url is None and s.world_size == 1
    assert diffpipe_home() == Path(".diffpipe").absolute()


def test_values_are_read_when_used_not_at_import(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every module is imported by now; a variable set afterwards still counts."""
    from diffpipe.tasks import tracking

    from diffusion_core import watermark as wm

    monkeypatch.setenv("DIFFPIPE_HOME", str(tmp_path / "home"))
    assert diffpipe_home() == tmp_path / "home"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri() == "http://mlflow:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # the config wins
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert s3_storage_options()["endpoint_url"] == "http://127.0.0.1:9000"
    monkeypatch.setenv("DIFFPIPE_RETRY_DELAYS", "0.5, 1,3")
    assert settings().retry_delays == (0.5, 1.0, 3.0)
    # The watermark key from the default variable and from one the configuration names.
    monkeypatch.setenv("DIFFPIPE_WATERMARK_KEY", "default secret, long enough")
    monkeypatch.setenv("OTHER_WM_KEY", "other secret, long enough too")
    default, other = wm.load_key(), wm.load_key(key_env="OTHER_WM_KEY")
    assert default.source == "$DIFFPIPE_WATERMARK_KEY" and other.source == "$OTHER_WM_KEY"
    assert default.key_id == wm.WatermarkKey(b"default secret, long enough", source="").key_id
    assert other.key_id == wm.WatermarkKey(b"other secret, long enough too", source="").key_id
    assert "default secret, long enough" not in repr(settings())


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DIFFPIPE_RETRY_DELAYS", "2,eight", "DIFFPIPE_RETRY_DELAYS='2,eight': .*number"),
        ("DIFFPIPE_RETRY_DELAYS", "-1", "DIFFPIPE_RETRY_DELAYS='-1': .*not negative"),
        ("DIFFPIPE_RETRY_DELAYS", "nan", "DIFFPIPE_RETRY_DELAYS='nan': .*finite"),
        ("DIFFPIPE_RETRY_DELAYS", ",".join(["1"] * (MAX_RETRIES + 1)), "at most 10 delays"),
        ("DIFFPIPE_STORE_CONCURRENCY", "0", "DIFFPIPE_STORE_CONCURRENCY='0': .*greater than"),
        ("WORLD_SIZE", "two", "WORLD_SIZE='two': .*integer"),
        ("DIFFPIPE_REQUIRE_BROWSER", "perhaps", "DIFFPIPE_REQUIRE_BROWSER='perhaps'"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        settings()


def test_every_variable_is_described() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "config_reference", Path(__file__).resolve().parents[1] / "docs" / "config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.environment_rows()
    assert all(doc for _, _, doc in rows), [name for name, _, doc in rows if not doc]
    assert "| `DIFFPIPE_RETRY_DELAYS` | `2,8` |" in script.environment_markdown()
    assert script.environment_markdown() in script.README.read_text()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DIFFPIPE_STORE_READ_TIMEOUT", "inf"),
        ("DIFFPIPE_STORE_CONNECT_TIMEOUT", "0"),
        ("DIFFPIPE_STORE_ATTEMPTS", "0"),
    ],
)
def test_store_bounds_must_be_finite_and_positive(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=f"{name}='{value}'"):
        s3_storage_options()
