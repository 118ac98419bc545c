"""Run configuration: typed, strict pydantic models loaded once from YAML at the edge.

Unknown keys and bad values are errors that name the file, the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from diffusion_core.settings import settings


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names file, key and allowed values."""


def _scalar_kinds(annotation: Any) -> set[type]:
    """The scalar types a field annotation admits (bool, int, float, str), through Optional,
    unions, Annotated and Literal; anything else adds ``object``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar_kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_scalar_kinds(a) for a in get_args(annotation)))
    if origin is Literal:
        return {type(v) for v in get_args(annotation)}
    if annotation in (bool, int, float, str, type(None)):
        return {annotation}
    return {object}


class StrictModel(BaseModel):
    """A config section: unknown keys are errors; numbers must be finite; integers and booleans
    are never coerced (``steps: true``, ``steps: 2.5``, ``steps: "10"`` and ``enabled: 1`` are
    errors, not 1, 2, 10 and true). The string under a field is its description (the README's
    configuration reference is generated from them: ``docs/config_reference.py``)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None or value is None:
            return value
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        wanted = (
            "a boolean (true or false)"
            if kinds & {bool, int, float} == {bool}
            else "an integer"
            if int in kinds and float not in kinds
            else "a number"
            if float in kinds
            else None
        )
        if wanted is None or object in kinds:
            return value
        if isinstance(value, bool):
            ok = bool in kinds
        elif isinstance(value, int):
            ok = bool(kinds & {int, float})
        elif isinstance(value, float):
            ok = float in kinds
        elif isinstance(value, str):
            ok = str in kinds
        else:
            ok = True  # lists, mappings: the field's own validation names them
        if not ok:
            raise ValueError(f"expected {wanted}")
        return value


# Names that become paths, MLflow model names and Prefect artifact keys: nothing that climbs out
# of a folder, nothing MLflow refuses (``/``, ``:``), never empty.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"

DatasetKind = Literal[
    "digits", "folder", "mnist", "fashion_mnist", "cifar10", "shapes", "volumes", "volume_folder"
]
# Kinds whose items are volumes (C, D, H, W) rather than images; they need ``model.dims: 3``.
VOLUME_KINDS = frozenset({"volumes", "volume_folder"})


class DataConfig(StrictModel):
    """The dataset: where it comes from, its size and its train/holdout split."""

    kind: DatasetKind = "digits"
    """digits (scikit-learn's, offline), folder, mnist, fashion_mnist, cifar10, shapes (captioned,
    synthetic), volumes (synthetic 3-D), volume_folder (.npy)."""
    image_size: int = Field(16, ge=4, le=1024)
    """The side of a square image or cubic volume."""
    channels: Literal[1, 3] | None = None
    """1 or 3; unset keeps the source's own channel count."""
    root: str | None = None
    """Image or volume folder (any fsspec URL), or the torchvision root."""
    download: bool = False
    """torchvision sets only: fetch them when missing."""
    holdout_fraction: float = Field(0.165, gt=0.0, lt=1.0)
    """Share of the data held out for evaluation (the reference set)."""
    split_seed: int = 0
    """Seed of the train/holdout split (and of the synthetic sets)."""
    num_samples: int = Field(2000, ge=1)
    """Synthetic sets only: how many items to draw."""
    follow_symlinks: bool = False
    """Folders on local disk: read symbolic links whose target lies outside data.root (off: such
    a link is an error naming it; links inside the root are always read)."""

    @model_validator(mode="after")
    def _root_required(self) -> DataConfig:
        if (
            self.kind in ("folder", "volume_folder", "mnist", "fashion_mnist", "cifar10")
            and not self.root
        ):
            raise ValueError(f"data.root is required for data.kind={self.kind!r}")
        return self


class ModelConfig(StrictModel):
    """The U-Net."""

    base_channels: int = Field(32, ge=8)
    """Channels of the first level."""
    channel_mults: tuple[int, ...] = (1, 2, 2)
    """Channel multiplier of each level (one level per entry; each halves the resolution)."""
    num_res_blocks: int = Field(1, ge=1)
    """Residual blocks per level."""
    attention_resolutions: tuple[int, ...] = (8,)
    """Feature-map sides with self-attention."""
    num_heads: int = Field(4, ge=1)
    """Attention heads."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout in the residual blocks."""
    class_conditional: bool = True
    """Condition on class labels (with a null class for classifier-free guidance)."""
    context_dim: int | None = None
    """Width of the text token states for cross-attention; unset takes the text encoder's."""
    dims: Literal[2, 3] = 2
    """2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W)."""


class DiffusionConfig(StrictModel):
    """The forward process and what the network predicts."""

    schedule: Literal["linear", "cosine", "sigmoid"] = "linear"
    """Noise schedule of the betas."""
    num_steps: int = Field(1000, ge=2)
    """Training timesteps T."""
    prediction: Literal["eps", "v", "x0", "edm"] = "eps"
    """What the network predicts: the noise, v, the clean image, or EDM's preconditioned target
    (Karras et al. 2022; its loss weighting comes with it)."""
    sigma_data: float = Field(0.5, gt=0.0)
    """prediction: edm only: the data's standard deviation in EDM's preconditioning."""
    min_snr_gamma: float | None = Field(None, gt=0.0)
    """Min-SNR loss weighting with this gamma; unset weighs every timestep alike."""
    timesteps: Literal["uniform", "lognormal"] = "uniform"
    """Training noise levels: uniform over the timesteps, or EDM's log-normal sigma."""
    lognormal_mean: float = -1.2
    """timesteps: lognormal only: the mean of ln sigma (EDM's P_mean)."""
    lognormal_std: float = Field(1.2, gt=0.0)
    """timesteps: lognormal only: the standard deviation of ln sigma (EDM's P_std)."""

    @model_validator(mode="after")
    def _knobs_that_apply(self) -> DiffusionConfig:
        if self.prediction == "edm" and self.min_snr_gamma is not None:
            raise ValueError(
                "diffusion.min_snr_gamma does not apply to prediction: edm (EDM's loss weighting "
                "comes with its target); remove it"
            )
        fields = type(self).model_fields
        changed = [k for k in fields if getattr(self, k) != fields[k].default]
        if "sigma_data" in changed and self.prediction != "edm":
            raise ValueError("diffusion.sigma_data applies to prediction: edm only")
        lognormal = [k for k in changed if k.startswith("lognormal_")]
        if lognormal and self.timesteps != "lognormal":
            raise ValueError(f"diffusion.{lognormal[0]} applies to timesteps: lognormal only")
        return self


Augment = Literal["none", "flip", "symmetries"]

SIGMA_REL_MAX = math.sqrt(1 / 12)
"""The widest power-function EMA (``train.ema_sigma_rel``): the plain running mean's, gamma = 0."""


class TrainConfig(StrictModel):
    """The optimisation."""

    steps: int = Field(2000, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(128, ge=1)
    """Global batch (split across processes under torchrun)."""
    lr: float = Field(2e-3, gt=0.0)
    """AdamW learning rate after warm-up."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    warmup_steps: int = Field(100, ge=0)
    """Linear learning-rate warm-up."""
    lr_decay: Literal["none", "cosine", "linear"] = "none"
    """After warm-up: the learning rate stays (none) or falls to ``lr_final`` times ``lr`` at
    the last step along a half cosine or a line."""
    lr_final: float = Field(0.0, ge=0.0, le=1.0)
    """The learning rate at the last step, as a fraction of ``lr`` (with ``lr_decay`` only)."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Gradient-norm clipping; unset: none."""
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    """Decay of the EMA weights (the weights that sample)."""
    ema_warmup: bool = True
    """EMA decay min(ema_decay, (1 + step) / (10 + step)) early on."""
    ema_sigma_rel: float | None = Field(None, gt=0.0, lt=SIGMA_REL_MAX)
    """Power-function EMA (Karras et al. 2024) instead of ema_decay: the averaging profile's
    width as a fraction of the run so far (0.05: its last ~10%); below sqrt(1/12)."""
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Share of labels replaced by the null class (for classifier-free guidance)."""
    augment: Augment = "none"
    """Mirror each training item along x with probability 1/2 (flip), or map it by a random
    symmetry of the square or cube (every axis mirrored at random, axes permuted: symmetries).
    Only for data with that symmetry: not digits, text or captions that say left or right."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast or fp32."""
    compile: bool = False
    """torch.compile the network."""
    checkpoint_every: int = Field(500, ge=1)
    """Steps between checkpoints (an interrupted run resumes from the last)."""
    log_every: int = Field(50, ge=1)
    """Steps between loss records."""
    seed: int = 0
    """Seed of the initial weights, the data order, timesteps and noise."""
    num_threads: int | None = Field(None, ge=1)
    """CPU threads for torch; unset: torch's default."""
    nproc: int | Literal["auto"] = "auto"
    """Training processes on this machine (torchrun, DDP): auto is one per visible GPU, or one
    process on a CPU; 2 or more on a CPU uses gloo."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept, locally and in the artefact store (newest first)."""
    loader_workers: int = Field(0, ge=0)
    """Processes reading the next steps' images ahead of training (0: read in the training
    process); images are read step by step, so a dataset need not fit in memory."""
    init_from: str = Field("none", pattern=r"^(none|champion|models:/[^/@]+(@[^/@]+|/[0-9]+))$")
    """Warm start from a registered version's EMA weights: none, champion (this model's
    champion; from scratch while there is none), models:/NAME@ALIAS or models:/NAME/N. Its model
    card must match this config's; the version is recorded as the new version's parent."""

    @model_validator(mode="after")
    def _one_ema_profile(self) -> TrainConfig:
        # By value, not by the keys given: a resolved config (all keys) must parse again.
        fields = type(self).model_fields
        moved = [k for k in ("ema_decay", "ema_warmup") if getattr(self, k) != fields[k].default]
        if self.ema_sigma_rel is not None and moved:
            raise ValueError(
                f"train.ema_sigma_rel={self.ema_sigma_rel} replaces train.{moved[0]}="
                f"{getattr(self, moved[0])}: set one EMA profile (ema_sigma_rel, or ema_decay "
                "with ema_warmup)"
            )
        return self

    @model_validator(mode="after")
    def _lr_final_needs_decay(self) -> TrainConfig:
        if self.lr_decay == "none" and self.lr_final != 0.0:
            raise ValueError(
                f"train.lr_final={self.lr_final} takes effect only with train.lr_decay "
                "(cosine or linear); set one or remove lr_final"
            )
        return self


SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral", "heun", "unipc"]
Spacing = Literal["leading", "trailing", "linspace", "karras"]
Variance = Literal["fixed_small", "fixed_large"]


class SamplingDefaults(StrictModel):
    """How a model samples unless a request says otherwise: the part of ``sample:`` that a model
    card carries (``diffusion_core.model.ModelCard.sampling``)."""

    sampler: SamplerName = "ddim"
    """ddpm, ddim, dpmpp_2m (DPM-Solver++(2M)), euler, euler_ancestral, heun (EDM's 2nd-order,
    2 x steps - 1 network evaluations) or unipc (UniPC-2)."""
    steps: int = Field(50, ge=1)
    """Sampling steps (one network evaluation each, heun's two; a guided step is one 2B batch)."""
    spacing: Spacing = "leading"
    """How the steps are spread over the training timesteps: leading, trailing, linspace, or
    karras (EDM's sigmas, rho = 7, over the schedule's whole range)."""
    guidance_scale: float = Field(1.0, ge=0.0)
    """Classifier-free guidance scale (1: none)."""
    guidance_interval: tuple[float, float] | None = None
    """Guide only at noise levels low < sigma <= high (EDM's sigma; Kynkaanniemi et al. 2024);
    unset: at every step."""
    eta: float = Field(0.0, ge=0.0, le=1.0)
    """DDIM's eta in [0, 1] (0 deterministic, 1 DDPM-like)."""
    variance: Variance = "fixed_small"
    """DDPM's posterior variance (beta tilde) or beta."""
    clip_x0: bool = True
    """Clip the x0 prediction to [-1, 1] at every step."""

    @model_validator(mode="after")
    def _interval_ordered(self) -> SamplingDefaults:
        interval = self.guidance_interval
        if interval is not None and not 0.0 <= interval[0] < interval[1]:
            raise ValueError(
                f"guidance_interval must be [low, high] with 0 <= low < high, got {list(interval)}"
            )
        return self


SAMPLING_KNOBS = tuple(SamplingDefaults.model_fields)


class SampleConfig(SamplingDefaults):
    """Sampling: the knobs a model card keeps as its defaults, and the batches, seed and prompts
    of the pipeline's samples (how many: ``pipeline.num_samples``). Knobs set here override the
    card's when a registered model is evaluated."""

    batch_size: int = Field(256, ge=1)
    """Samples per network batch."""
    seed: int = 0
    """Sample i starts from the noise of seed ``seed * 10**6 + i``."""
    prompts: tuple[str, ...] = ()
    """Text models: the samples cycle through these prompts."""

    def defaults(self) -> SamplingDefaults:
        """The sampling knobs of this section (explicit or default) as a card's defaults."""
        return SamplingDefaults(**{k: getattr(self, k) for k in SAMPLING_KNOBS})

    def overrides(self) -> dict[str, Any]:
        """The sampling knobs this section sets explicitly (the rest comes from the card)."""
        return {k: getattr(self, k) for k in SAMPLING_KNOBS if k in self.model_fields_set}


class TextConfig(StrictModel):
    """Text conditioning on a frozen open_clip text encoder (see ``diffusion_core.text``).

    ``model``: a built-in open_clip name, a JSON model config file or ``local-dir:/path``.
    ``pretrained``: a local weights file or fsspec URL (checked against ``sha256`` when given),
    an open_clip hub tag (fetched only with ``download: true``), or None for random weights drawn
    from ``seed`` (offline runs: distinct, fixed embeddings per prompt).
    """

    model: str
    """open_clip model: a built-in name, a JSON model config (relative: beside the config file)
    or local-dir:/path."""
    pretrained: str | None = None
    """Weights: a file or fsspec URL, an open_clip hub tag, or unset for random weights."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    """Expected sha256 of the weights file."""
    download: bool = False
    """Allow fetching a hub tag."""
    seed: int = 0
    """Seed of random weights (when pretrained is unset)."""
    use_pooled: bool = True
    """Add the pooled prompt embedding to the time embedding."""
    prompt_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Share of captions replaced by the empty prompt in training."""


MaskKind = Literal["centre", "strokes", "half"]
MASK_KINDS: tuple[MaskKind, ...] = ("centre", "strokes", "half")


class InpaintEvalConfig(StrictModel):
    """Inpainting evaluation on holdout images: RePaint against plain replacement."""

    enabled: bool = False
    """Run the inpainting evaluation after the main one."""
    num_images: int = Field(32, ge=1)
    """Holdout images, each inpainted once per mask and method."""
    masks: tuple[MaskKind, ...] = Field(MASK_KINDS, min_length=1)
    """Standard masks: centre box, seeded strokes, half image."""
    jump_length: int = Field(10, ge=1)
    """RePaint's jump length j."""
    resample: int = Field(10, ge=2)
    """RePaint's resampling count r (plain replacement, r = 1, always runs beside it)."""
    seed: int = 0
    """Seed of the stroke masks."""

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
    """Mark the published images with the model's name tag and version."""
    key_env: str = Field("DIFFPIPE_WATERMARK_KEY", min_length=1)
    """Environment variable holding the key."""
    key_file: str | None = None
    """File holding the key (wins over key_env)."""
    strength: float = Field(18.0, gt=0.0, le=128.0)
    """Quantisation step in grey levels (the verifier must use the same)."""


class PipelineConfig(StrictModel):
    """Where a pipeline run keeps things, and how much it samples."""

    artefact_root: str | None = None
    """Where artefacts live (a path, file:// or s3://); unset: file://$DIFFPIPE_HOME/artefacts."""
    tracking_uri: str | None = None
    """MLflow tracking and registry; unset: MLFLOW_TRACKING_URI or SQLite under DIFFPIPE_HOME."""
    model_name: str | None = Field(None, pattern=SAFE_NAME)
    """Registered model name (the characters name allows); unset: the config's name."""
    num_samples: int = Field(1000, ge=2, le=1_000_000)
    """Samples drawn for safety filtering and evaluation (at most 1,000,000)."""
    shards: int = Field(2, ge=1)
    """Sampling tasks (the samples are the same whatever the sharding)."""
    inpainting: InpaintEvalConfig = InpaintEvalConfig()
    """The inpainting evaluation."""
    watermark: WatermarkConfig = WatermarkConfig()
    """The watermark on published images."""
    lock_wait_seconds: float = Field(0.0, ge=0.0)
    """How long a nightly run waits while another run of the same model holds this
    DIFFPIPE_HOME; then it exits 1 naming that run."""


class PromotionConfig(StrictModel):
    """When a challenger replaces the champion: its FID interval lies entirely below the
    champion's, and no guarded metric is worse than the champion's beyond its tolerance (unset:
    that guardrail is off). A metric either side lacks (conditional accuracy of an unconditional
    model) is not judged."""

    reevaluate_champion: bool = True
    """When the records differ only in the reference data or the judge (new data), evaluate the
    champion again on the challenger's terms (same seeds) and decide on those."""
    precision_drop: float | None = Field(0.02, ge=0.0)
    """Largest allowed fall in precision."""
    recall_drop: float | None = Field(0.02, ge=0.0)
    """Largest allowed fall in recall."""
    conditional_accuracy_drop: float | None = Field(0.01, ge=0.0)
    """Largest allowed fall in conditional accuracy (class-conditional models)."""
    memorisation_rise: float | None = Field(0.005, ge=0.0)
    """Largest allowed rise in the share of samples the memorisation detector flags."""
    safety_flag_rise: float | None = Field(0.01, ge=0.0)
    """Largest allowed rise in the share of samples the safety filter quarantines."""


class DetectorConfig(StrictModel):
    """One safety detector: a built-in name (sanity, memorisation, concept) or a plug-in's
    name in the ``diffpipe.detectors`` entry point group, and the keyword parameters (its
    thresholds among them) it is built with; checked when the chain is built."""

    name: str = Field(min_length=1)
    """sanity, memorisation, concept, or a plug-in's name."""
    enabled: bool = True
    """Run this detector."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword parameters of the detector (its thresholds among them)."""


class SafetyConfig(StrictModel):
    """The safety filter's detector chain, run in order; an image is published only when every
    enabled detector passed it."""

    detectors: tuple[DetectorConfig, ...] = (
        DetectorConfig(name="sanity"),
        DetectorConfig(name="memorisation"),
    )
    """The chain, in order: each entry a name, enabled and params."""

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
    """The sampler."""
    steps: int = Field(ge=1)
    """Its steps."""
    spacing: Spacing | None = None
    """Its timestep spacing; unset: the model's (or the sample section's)."""


EvaluationExtractor = Literal["domain", "inception-v3-compat"]


class EvaluationConfig(StrictModel):
    """How samples are judged: the feature extractor, the sample counts, the intervals, and an
    optional sweep of sampler settings (each run at ``sweep_num_samples`` samples)."""

    extractor: EvaluationExtractor = "domain"
    """Features of FID/KID/precision/recall: domain (the dataset's own classifier, offline) or
    inception-v3-compat (weights from ``weights``)."""
    weights: str | None = None
    """inception-v3-compat only: a local path or fsspec URL of the weights."""
    weights_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    """Expected sha256 of the Inception weights."""
    num_samples: int | None = Field(None, ge=4)
    """Published samples evaluated; unset: all."""
    interval_draws: int = Field(100, ge=2)
    """Half-sample draws of the FID and KID intervals."""
    interval_level: float = Field(0.95, gt=0.0, lt=1.0)
    """Level of the intervals."""
    batch_size: int = Field(64, ge=1)
    """Feature-extraction batch."""
    sweep: tuple[SweepSetting, ...] = ()
    """Sampler settings to sweep (quality against cost): a list of {sampler, steps}."""
    sweep_num_samples: int = Field(500, ge=4)
    """Samples per sweep setting."""

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
        seen = [(s.sampler, s.steps, s.spacing) for s in self.sweep]
        dupes = sorted({f"{a}:{b}" for a, b, c in seen if seen.count((a, b, c)) > 1})
        if dupes:
            raise ValueError(f"evaluation.sweep repeats {', '.join(dupes)}")
        return self


class TaskRunnerConfig(StrictModel):
    """Where the bulk work (sampling shards) runs: Prefect's thread runner in the flow's process,
    or a Dask cluster through prefect-dask."""

    kind: Literal["threads", "dask"] = "threads"
    """threads (one process) or dask."""
    address: str | None = None
    """dask: the scheduler address of a running cluster (tcp://host:8786); unset: a local cluster
    started for the run."""
    n_workers: int = Field(2, ge=1)
    """dask, local cluster: worker processes."""
    threads_per_worker: int = Field(1, ge=1)
    """dask, local cluster: threads per worker."""
    gpus_per_worker: int = Field(0, ge=0)
    """dask: the GPU resource each worker offers; with it, each sampling shard holds one GPU."""


class RuntimeConfig(StrictModel):
    """Where the compute runs. Never part of a model's identity: a model trained on one device
    samples on another."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    """auto (CUDA when present, else the CPU), cpu, cuda or cuda:N; every compute step uses it."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Sampling and feature extraction: auto is bf16 autocast on CUDA and fp32 on a CPU."""
    compile: bool = False
    """The sample step samples with a ``torch.compile``d copy of the network (frozen weights):
    faster per step, but every sampling shard compiles once, which repays only when a shard
    samples many images (the break-even on a CPU: bench/README.md, sample_throughput.py)."""
    task_runner: TaskRunnerConfig = TaskRunnerConfig()
    """Where the sampling shards run."""


DEFAULT_RUNTIME = RuntimeConfig()


class RunConfig(StrictModel):
    """A run: the model card's sections (model, diffusion, text), the data and training, and the
    pipeline's sections (sample, safety, evaluation, pipeline)."""

    name: str = Field("diffpipe", pattern=SAFE_NAME)
    """The run's name (and the registered model's, unless pipeline.model_name): letters, digits,
    '.', '_' and '-', starting with a letter or digit, at most 100 characters."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    pipeline: PipelineConfig = PipelineConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    safety: SafetyConfig = SafetyConfig()
    promotion: PromotionConfig = PromotionConfig()
    """When a challenger becomes the champion."""
    text: TextConfig | None = None
    """Text conditioning (unset: class labels or none)."""
    runtime: RuntimeConfig = RuntimeConfig()

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
    def _removed_keys(cls, data: Any) -> Any:
        sample = data.get("sample") if isinstance(data, dict) else None
        if isinstance(sample, dict) and "num_samples" in sample:
            raise ValueError(
                "sample.num_samples is no longer read: the pipeline draws pipeline.num_samples "
                "samples and `diffpipe sample` takes --num; remove the key"
            )
        return data

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
        return _digest(self.to_dict())

    def training_identity(self, dataset_sha256: str, init_sha256: str | None = None) -> str:
        """sha256 of what changes the trained weights: the model, diffusion, text and train
        sections (without the bookkeeping of :data:`TRAIN_BOOKKEEPING`), the dataset's content,
        and the starting weights of a warm start (``init_sha256``; ``train.init_from`` itself
        names a version, not weights). Sampling, safety, evaluation, watermark and sharding
        never enter it, so changing them never retrains."""
        train = self.train.model_dump(mode="json", exclude={*TRAIN_BOOKKEEPING, "init_from"})
        for key in TRAIN_IDENTITY_WHEN_SET:
            if train[key] == TrainConfig.model_fields[key].default:
                del train[key]
        return _digest(
            {
                "model": self.model.model_dump(mode="json"),
                "diffusion": self.diffusion.model_dump(mode="json"),
                "text": None if self.text is None else _text_identity(self.text),
                "train": train,
                "dataset_sha256": dataset_sha256,
                **({"init_sha256": init_sha256} if init_sha256 else {}),
            }
        )


# Train settings that decide when to log and save and where to run, not what the weights become.
TRAIN_BOOKKEEPING = (
    "checkpoint_every",
    "log_every",
    "num_threads",
    "nproc",
    "keep_checkpoints",
    "loader_workers",
)

# Train settings added after checkpoints were written: they enter the identity only when they
# differ from their default, so those checkpoints keep their identity and still resume.
TRAIN_IDENTITY_WHEN_SET = ("lr_decay", "lr_final", "augment", "ema_sigma_rel")


def _text_identity(text: TextConfig) -> dict[str, Any]:
    """The text section as it decides the weights: a JSON model config by its content and
    weights checked against ``sha256`` by that digest, not by where this host keeps them (a
    checkout elsewhere, another worker), so that a run resumes wherever its store is read."""
    out = text.model_dump(mode="json")
    model = Path(text.model).expanduser()
    if text.model.endswith(".json") and model.is_file():
        # Unreadable: the path stays, and the text encoder's loader names the file and the error.
        with contextlib.suppress(OSError):
            out["model"] = {"json_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    if text.pretrained is not None and text.sha256 is not None:
        out["pretrained"] = None  # named by out["sha256"]
        out["sha256"] = text.sha256.lower()
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def diffpipe_home() -> Path:
    """``$DIFFPIPE_HOME`` as an absolute path; ``./.diffpipe`` when unset or empty."""
    return settings().diffpipe_home.expanduser().absolute()


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
    msg = msg.removeprefix("Value error, ")
    if kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == SAFE_NAME:
        msg = "a name is letters, digits, '.', '_' and '-', starting with a letter or digit"
    return f"key '{key}': {msg} (got {error.get('input')!r})"


MAX_CONFIG_VALUES = 100_000  # values a config may hold with its YAML aliases expanded
MAX_CONFIG_DEPTH = 64  # how deep its mappings and lists may nest


def _check_shape(data: Any, source: str) -> None:
    """Refuse a config that nests too deeply, holds itself, or stands for more than
    :data:`MAX_CONFIG_VALUES` values: YAML aliases let a few lines repeat a list within a list
    until it holds billions of values (and a value may even contain itself)."""
    sizes: dict[int, int] = {}  # a value seen through several aliases is counted once per use
    open_ids: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, dict | list):
            return 1
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: values nested more than {MAX_CONFIG_DEPTH} levels deep")
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_ids:
            raise ConfigError(f"{source}: a YAML alias makes a value contain itself")
        open_ids.add(id(node))
        total = 1
        for child in node.values() if isinstance(node, dict) else node:
            total += size(child, depth + 1)
            if total > MAX_CONFIG_VALUES:
                raise ConfigError(
                    f"{source}: more than {MAX_CONFIG_VALUES:,} values once its YAML aliases "
                    "are expanded; write the values out"
                )
        open_ids.discard(id(node))
        sizes[id(node)] = total
        return total

    size(data, 0)


def parse_config(data: dict[str, Any], *, source: str = "<config>") -> RunConfig:
    """Validate a raw mapping into a RunConfig; errors name ``source``, the key and the rule."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    _check_shape(data, source)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, RunConfig) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with dotted-key ``overrides`` (``{"train.steps": 100}``) set; a key that goes
    through a value that is not a mapping (``name.x``) is a ConfigError naming it."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                inside = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"override {dotted}: {inside} is {node!r}, not a section with keys"
                )
        node[leaf] = value
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML from ``path``, apply dotted-key ``overrides`` and validate.

    A text encoder given as a relative JSON model config (``text.model: clip/x.json``) that does
    not exist relative to the working directory is looked up beside the config file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a config needs at least a name")
    cfg = parse_config(apply_overrides(data, overrides), source=str(path))
    if cfg.text is not None and cfg.text.model.endswith(".json"):
        model = Path(cfg.text.model).expanduser()
        beside = path.parent / model
        if not model.is_absolute() and not model.exists() and beside.is_file():
            text = cfg.text.model_copy(update={"model": str(beside.resolve())})
            cfg = cfg.model_copy(update={"text": text})
    return cfg
