"""Every environment variable diffpipe reads, in one ``pydantic-settings`` object.

Nothing reads the environment at import: code that needs a value calls :func:`settings` where it
needs it, so a variable set later (the command line's defaults for Prefect, a test) is seen. A
value that cannot be used raises :class:`SettingsError` naming the variable and the value. The
README's table of environment variables is generated from the fields below
(``python docs/config_reference.py``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MAX_RETRIES = 10  # the most delays DIFFPIPE_RETRY_DELAYS may list
WATERMARK_KEY_VARIABLE = "DIFFPIPE_WATERMARK_KEY"


class SettingsError(ValueError):
    """An environment variable whose value cannot be used; the message names both."""


class Settings(BaseSettings):
    """diffpipe's environment variables (an empty variable counts as unset)."""

    model_config = SettingsConfigDict(
        case_sensitive=True,
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,
    )

    diffpipe_home: Path = Field(Path(".diffpipe"), alias="DIFFPIPE_HOME")
    """Where local state lives (relative: to the working directory): work dirs, SQLite
    databases, caches, the default artefact root."""
    mlflow_tracking_uri: str | None = Field(None, alias="MLFLOW_TRACKING_URI")
    """The MLflow tracking server and registry (unset: ``sqlite:///$DIFFPIPE_HOME/mlflow.db``);
    the config's ``tracking.uri`` wins."""
    aws_endpoint_url: str | None = Field(None, alias="AWS_ENDPOINT_URL")
    """S3-compatible endpoint for ``s3://`` roots and image folders (MLflow reads its own
    ``MLFLOW_S3_ENDPOINT_URL``); credentials come from the usual AWS variables, read by boto."""
    store_concurrency: int = Field(16, ge=1, le=256, alias="DIFFPIPE_STORE_CONCURRENCY")
    """Files the artefact store moves at once when it writes or reads a directory."""
    store_connect_timeout: float = Field(
        10.0, gt=0.0, le=3600.0, allow_inf_nan=False, alias="DIFFPIPE_STORE_CONNECT_TIMEOUT"
    )
    """Seconds an S3 request may wait for its connection (the store's and image folders on
    S3)."""
    store_read_timeout: float = Field(
        60.0, gt=0.0, le=3600.0, allow_inf_nan=False, alias="DIFFPIPE_STORE_READ_TIMEOUT"
    )
    """Seconds an S3 request may wait for the next bytes of its answer."""
    store_attempts: int = Field(3, ge=1, le=10, alias="DIFFPIPE_STORE_ATTEMPTS")
    """Tries of one S3 request (botocore's standard retry mode) before the store operation
    fails; a stalled endpoint fails it after about attempts x (connect + read timeout)."""
    retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        (2.0, 8.0), alias="DIFFPIPE_RETRY_DELAYS"
    )
    """Seconds between tries of the pipeline's I/O tasks, comma-separated (one retry each);
    read when ``diffpipe.tasks`` defines its tasks."""
    watermark_key: SecretStr | None = Field(None, alias=WATERMARK_KEY_VARIABLE)
    """The watermark key (the default of ``pipeline.watermark.key_env``, which may name another
    variable)."""
    prefect_api_url: str | None = Field(None, alias="PREFECT_API_URL")
    """A Prefect server; unset, Prefect starts its local API on SQLite under
    ``$PREFECT_HOME``."""
    prefect_home: Path | None = Field(None, alias="PREFECT_HOME")
    """Prefect's own state (unset: ``$DIFFPIPE_HOME/prefect`` for diffpipe's commands)."""
    max_samples: int = Field(100_000, ge=1, alias="DIFFPIPE_MAX_SAMPLES")
    """The most samples one request may ask ``diffpipe sample``, ``diffpipe inpaint`` or the
    MLflow model for (the model's ``model_config`` ``max_samples`` overrides it); larger
    requests are refused before any work."""
    world_size: int = Field(1, ge=1, alias="WORLD_SIZE")
    """Set by ``torchrun``: the number of training processes."""
    local_rank: int | None = Field(None, ge=0, alias="LOCAL_RANK")
    """Set by ``torchrun``: this process's GPU on its host."""
    rank: int = Field(0, ge=0, alias="RANK")
    """Set by ``torchrun``: this process's rank among all training processes."""
    nnodes: int = Field(1, ge=1, alias="DIFFPIPE_NNODES")
    """Machines that train together (the work pool's job template sets it; more than 1 needs
    ``DIFFPIPE_RDZV_ENDPOINT``)."""
    node_rank: int = Field(0, ge=0, alias="DIFFPIPE_NODE_RANK")
    """This machine's place among them: 0 runs the flow's train step, the others
    ``diffpipe train-node``."""
    rdzv_endpoint: str | None = Field(None, alias="DIFFPIPE_RDZV_ENDPOINT")
    """host:port where the training machines meet (torchrun's c10d rendezvous on node 0)."""
    rdzv_id: str = Field("diffpipe", alias="DIFFPIPE_RDZV_ID")
    """An id unique to one multi-node training (e.g. the flow run's name)."""
    require_browser: bool = Field(False, alias="DIFFPIPE_REQUIRE_BROWSER")
    """Tests only: fail instead of skipping when Chromium is missing (CI sets 1)."""
    screenshot_dir: Path | None = Field(None, alias="DIFFPIPE_SCREENSHOT_DIR")
    """Tests only: where the report test copies its screenshot."""

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        return value

    @field_validator("retry_delays")
    @classmethod
    def _check_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) > MAX_RETRIES:
            raise ValueError(f"at most {MAX_RETRIES} delays")
        if not all(math.isfinite(v) and v >= 0 for v in value):
            raise ValueError("delays must be finite and not negative")
        return value

    def s3_config(self) -> dict[str, Any]:
        """botocore ``Config`` options that bound every S3 request: the connect and read
        timeouts and the tries (standard retry mode, which retries timeouts, refused connections,
        throttling and 5xx answers)."""
        return {
            "connect_timeout": self.store_connect_timeout,
            "read_timeout": self.store_read_timeout,
            "retries": {"total_max_attempts": self.store_attempts, "mode": "standard"},
        }

    def secret(self, variable: str) -> SecretStr | None:
        """The variable ``variable`` as a secret, or None when unset or empty: for names the
        configuration chooses (``pipeline.watermark.key_env``)."""
        if variable == WATERMARK_KEY_VARIABLE:
            return self.watermark_key
        value = os.environ.get(variable)
        return SecretStr(value) if value else None


def settings() -> Settings:
    """The environment as it is now; SettingsError names a variable that cannot be used."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0])  # the variable (items of a list add their index)
            value = os.environ.get(name)
            problems.append(f"{name}={value!r}: {error['msg']}")
        raise SettingsError("environment: " + "; ".join(problems)) from None
