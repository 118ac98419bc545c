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
    prompts: tuple[str, ...] = ()  # text-conditioned models: samples cycle through these


class TextConfig(StrictModel):
    """Text conditioning on a frozen open_clip text encoder (see ``diffusion_core.clip``).

    ``model``: a built-in open_clip name, a JSON model config file or ``local-dir:/path``.
    ``pretrained``: a local weights file or fsspec URL (checked against ``sha256`` when given),
    an open_clip hub tag (fetched only with ``download: true``), or None for random weights drawn
    from ``seed`` (offline runs: distinct, fixed embeddings per prompt).
    """

    model: str
    pretrained: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    download: bool = False
    seed: int = 0  # initialises random weights when pretrained is None
    use_pooled: bool = True  # the pooled prompt embedding is added to the time embedding
    prompt_dropout: float = Field(0.1, ge=0.0, le=1.0)  # captions replaced by "" in training


MaskKind = Literal["centre", "strokes", "half"]
MASK_KINDS: tuple[MaskKind, ...] = ("centre", "strokes", "half")


class InpaintEvalConfig(StrictModel):
    """Inpainting evaluation on holdout images: RePaint against plain replacement."""

    enabled: bool = False
    num_images: int = Field(32, ge=1)  # holdout images, each inpainted once per mask and method
    masks: tuple[MaskKind, ...] = Field(MASK_KINDS, min_length=1)
    jump_length: int = Field(10, ge=1)  # RePaint's jump length j
    resample: int = Field(10, ge=2)  # RePaint's resampling count r (1 is the replacement baseline)
    seed: int = 0  # for the stroke masks

    @model_validator(mode="after")
    def _distinct_masks(self) -> InpaintEvalConfig:
        if len(set(self.masks)) != len(self.masks):
            raise ValueError(f"masks must be distinct, got {list(self.masks)}")
        return self


class WatermarkConfig(StrictModel):
    """The invisible watermark on published images (``diffusion_core.watermark``).

    The key is never part of the config (configs are logged to MLflow and saved beside every
    checkpoint): it is read from ``key_file`` when set, else from the environment variable
    ``key_env``, else from ``$DIFFPIPE_HOME/watermark.key`` (created on first use). The
    payload is fixed at 48 bits (model name tag, version, CRC-16); ``strength`` is the
    quantisation step in grey levels, and the verifier must use the same one.
    """

    enabled: bool = False
    key_env: str = Field("DIFFPIPE_WATERMARK_KEY", min_length=1)
    key_file: str | None = None
    strength: float = Field(18.0, gt=0.0, le=128.0)


class PipelineConfig(StrictModel):
    """Where a pipeline run keeps things, and how much it samples."""

    artefact_root: str | None = None  # default: file://$DIFFPIPE_HOME/artefacts
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or sqlite under DIFFPIPE_HOME
    model_name: str | None = None  # registered model name; default: the config's name
    num_samples: int = Field(1000, ge=2)  # samples drawn for safety filtering and evaluation
    shards: int = Field(2, ge=1)  # sampling tasks run in parallel
    inpainting: InpaintEvalConfig = InpaintEvalConfig()
    watermark: WatermarkConfig = WatermarkConfig()


class DetectorConfig(StrictModel):
    """One safety detector: a built-in name (sanity, memorisation, concept) or a plug-in's
    name in the ``diffpipe.detectors`` entry point group, and the keyword parameters (its
    thresholds among them) it is built with; checked when the chain is built."""

    name: str = Field(min_length=1)
    enabled: bool = True
    params: dict[str, Any] = Field(default_factory=dict)


class SafetyConfig(StrictModel):
    """The safety filter's detector chain, run in order; an image is published only when every
    enabled detector passed it."""

    detectors: tuple[DetectorConfig, ...] = (
        DetectorConfig(name="sanity"),
        DetectorConfig(name="memorisation"),
    )

    @model_validator(mode="after")
    def _names_unique_and_one_enabled(self) -> SafetyConfig:
        names = [d.name for d in self.detectors]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"safety.detectors lists {', '.join(repeated)} more than once")
        if not any(d.enabled for d in self.detectors):
            raise ValueError("safety.detectors: at least one detector must be enabled")
        return self


class SweepSetting(StrictModel):
    """One sampler setting of the quality-vs-cost sweep."""

    sampler: SamplerName
    steps: int = Field(ge=1)


EvaluationExtractor = Literal["domain", "inception-v3-compat"]


class EvaluationConfig(StrictModel):
    """How samples are judged: the feature extractor, the sample counts, the intervals, and an
    optional sweep of sampler settings (each run at ``sweep_num_samples`` samples)."""

    extractor: EvaluationExtractor = "domain"  # domain: the dataset's own classifier
    weights: str | None = None  # inception-v3-compat only: a local path or fsspec URL
    weights_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    num_samples: int | None = Field(None, ge=4)  # published samples evaluated; None: all
    interval_draws: int = Field(100, ge=2)
    interval_level: float = Field(0.95, gt=0.0, lt=1.0)
    batch_size: int = Field(64, ge=1)
    sweep: tuple[SweepSetting, ...] = ()
    sweep_num_samples: int = Field(500, ge=4)

    @model_validator(mode="after")
    def _weights_for_extractor(self) -> EvaluationConfig:
        if self.extractor == "inception-v3-compat" and not self.weights:
            raise ValueError(
                "evaluation.weights is required for evaluation.extractor='inception-v3-compat' "
                "(a local path or URL of the weights; nothing is downloaded unless configured)"
            )
        if self.extractor == "domain" and (self.weights or self.weights_sha256):
            raise ValueError(
                "evaluation.weights and evaluation.weights_sha256 apply only to "
                "evaluation.extractor='inception-v3-compat' (the domain classifier is trained "
                "from the dataset)"
            )
        seen = [(s.sampler, s.steps) for s in self.sweep]
        dupes = sorted({f"{a}:{b}" for a, b in seen if seen.count((a, b)) > 1})
        if dupes:
            raise ValueError(f"evaluation.sweep repeats {', '.join(dupes)}")
        return self


class RunConfig(StrictModel):
    name: str = "diffpipe"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    pipeline: PipelineConfig = PipelineConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    safety: SafetyConfig = SafetyConfig()
    text: TextConfig | None = None

    @model_validator(mode="after")
    def _volume_memorisation_in_pixels(self) -> RunConfig:
        """Volumes are safety-checked on their projections, which the domain classifier (a 3-D
        network) cannot read: memorisation there works in pixel space only."""
        if self.model.dims == 3:
            for i, d in enumerate(self.safety.detectors):
                if d.name == "memorisation" and d.params.get("feature_space") is True:
                    raise ValueError(
                        f"safety.detectors[{i}].params.feature_space: true is not available for "
                        "volumes (model.dims: 3); their projections are compared in pixel space"
                    )
        return self

    @model_validator(mode="after")
    def _text_or_classes(self) -> RunConfig:
        if self.text is not None and self.model.class_conditional:
            raise ValueError("text conditioning needs model.class_conditional: false")
        return self

    @model_validator(mode="before")
    @classmethod
    def _legacy_detectors(cls, data: Any) -> Any:
        """Configs saved before the ``safety:`` section (beside checkpoints, in registered
        models) list detector names under ``pipeline.detectors``: read them as the chain, with
        ``invalid`` under its present name ``sanity``."""
        pipeline = data.get("pipeline") if isinstance(data, dict) else None
        if not (isinstance(pipeline, dict) and "detectors" in pipeline):
            return data
        if "safety" in data:
            raise ValueError("pipeline.detectors is replaced by safety.detectors; give only safety")
        names = pipeline["detectors"]
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"pipeline.detectors must be a list of names, got {names!r}")
        renamed = ["sanity" if n == "invalid" else n for n in names]
        return {
            **data,
            "pipeline": {k: v for k, v in pipeline.items() if k != "detectors"},
            "safety": {"detectors": [{"name": n} for n in renamed]},
        }

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
