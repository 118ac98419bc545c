"""Run configuration: typed, strict pydantic models loaded once from YAML at the edge.

Unknown keys and bad values are errors that name the file, the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names file, key and allowed values."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DatasetKind = Literal[
    "digits", "folder", "mnist", "fashion_mnist", "cifar10", "shapes", "volumes", "volume_folder"
]
# Kinds whose items are volumes (C, D, H, W) rather than images; they need ``model.dims: 3``.
VOLUME_KINDS = frozenset({"volumes", "volume_folder"})


class DataConfig(StrictModel):
    kind: DatasetKind = "digits"
    image_size: int = Field(16, ge=4, le=1024)  # the side of a square image or cubic volume
    channels: Literal[1, 3] | None = None  # None keeps the source's own channel count
    root: str | None = None  # image/volume folder URL (any fsspec URL) or torchvision root
    download: bool = False  # torchvision sets only: fetch when missing
    holdout_fraction: float = Field(0.165, gt=0.0, lt=1.0)
    split_seed: int = 0
    num_samples: int = Field(2000, ge=1)  # synthetic sets only

    @model_validator(mode="after")
    def _root_required(self) -> DataConfig:
        if (
            self.kind in ("folder", "volume_folder", "mnist", "fashion_mnist", "cifar10")
            and not self.root
        ):
            raise ValueError(f"data.root is required for data.kind={self.kind!r}")
        return self


class ModelConfig(StrictModel):
    base_channels: int = Field(32, ge=8)
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = Field(1, ge=1)
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    class_conditional: bool = True
    context_dim: int | None = None  # width of text token states for cross-attention
    dims: Literal[2, 3] = 2  # 2: images (B, C, H, W); 3: volumes (B, C, D, H, W)


class DiffusionConfig(StrictModel):
    schedule: Literal["linear", "cosine", "sigmoid"] = "linear"
    num_steps: int = Field(1000, ge=2)
    prediction: Literal["eps", "v", "x0"] = "eps"
    min_snr_gamma: float | None = Field(None, gt=0.0)


class TrainConfig(StrictModel):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)) early on
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)
    precision: Literal["bf16", "fp32"] = "bf16"
    compile: bool = False
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    seed: int = 0
    num_threads: int | None = Field(None, ge=1)


SamplerName = Literal["ddpm", "ddim", "dpmpp_2m"]


class SampleConfig(StrictModel):
    sampler: SamplerName = "ddim"
    steps: int = Field(50, ge=1)
    spacing: Literal["leading", "trailing", "linspace"] = "leading"
    guidance_scale: float = Field(1.0, ge=0.0)
    eta: float = Field(0.0, ge=0.0)
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small"
    clip_x0: bool = True
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=1)
    seed: int = 0


class PipelineConfig(StrictModel):
    """Where a pipeline run keeps things, and how much it samples."""

    artefact_root: str | None = None  # default: file://$DIFFPIPE_HOME/artefacts
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or sqlite under DIFFPIPE_HOME
    model_name: str | None = None  # registered model name; default: the config's name
    num_samples: int = Field(1000, ge=2)  # samples drawn for safety filtering and evaluation
    shards: int = Field(2, ge=1)  # sampling tasks run in parallel
    detectors: tuple[str, ...] = ("invalid", "memorisation")


class RunConfig(StrictModel):
    name: str = "diffpipe"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _dims_fit_data(self) -> RunConfig:
        volumes = self.data.kind in VOLUME_KINDS
        if volumes != (self.model.dims == 3):
            need = 3 if volumes else 2
            raise ValueError(
                f"model.dims={self.model.dims} does not fit data.kind={self.data.kind!r}: "
                f"{'volume' if volumes else 'image'} data needs model.dims={need} "
                f"(volume kinds: {', '.join(sorted(VOLUME_KINDS))})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "<top level>"
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        parent = model
        for part in error["loc"][:-1]:
            field = parent.model_fields.get(str(part))
            annotation = getattr(field, "annotation", None)
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            parent = annotation
        return f"unknown key '{key}' (allowed here: {', '.join(sorted(parent.model_fields))})"
    return f"key '{key}': {msg} (got {error.get('input')!r})"


def parse_config(data: dict[str, Any], *, source: str = "<config>") -> RunConfig:
    """Validate a raw mapping into a RunConfig; errors name ``source``, the key and the rule."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, RunConfig) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML from ``path``, apply dotted-key ``overrides`` and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(data, source=str(path))
