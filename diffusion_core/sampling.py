"""Sampling a trained network: one request type, merged with the model card's defaults in one
place, and two entry points, :func:`generate` and :func:`inpaint`.

A :class:`SampleRequest` names what the caller wants (how many, which classes or prompts, the
seed) and any sampling knob it wants to change; a knob left out takes the card's default
(``ModelCard.sampling``). The command line, the MLflow model, the pipeline and the benchmarks all
build requests; :meth:`SampleRequest.knobs` is the only place where the two are merged.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffusion_core.config import (
    SAMPLING_KNOBS,
    SampleConfig,
    SamplerName,
    SamplingDefaults,
    Spacing,
    StrictModel,
    Variance,
)
from diffusion_core.distributed import autocast
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.io import read_mask, to_grey
from diffusion_core.model import ModelCard
from diffusion_core.parameterization import Cond, Denoiser, DenoiserFn, prediction_for
from diffusion_core.repaint import inpaint as repaint
from diffusion_core.samplers import run_sampler, sampler_nfe
from diffusion_core.schedules import NoiseSchedule, sampling_grid
from diffusion_core.text import (
    NULL_PROMPT,
    ClipModel,
    check_encoder,
    cycle_prompts,
    load_text_encoder,
    text_cond,
)
from diffusion_core.unet import CompiledForInference, UNet, channels_last_format

DEFAULT_NUM_SAMPLES = 8  # when a request names neither a count nor labels nor prompts
MAX_BATCH_SIZE = 4096  # images in one network call; memory grows with it
MAX_SEED = 9_000_000_000_000  # sample i's noise seed is seed * 10**6 + i: it must fit in int64


class RequestTooLarge(ValueError):
    """A request over the limits (``DIFFPIPE_MAX_SAMPLES``, the model's ``max_samples``)."""


def check_size(request: SampleRequest, limit: int) -> None:
    """Refuse, before any work, a request for more than ``limit`` samples (a count, or labels
    or prompts one a sample), naming the limit and how to change it."""
    n = request.count()
    if n > limit:
        raise RequestTooLarge(
            f"num_samples {n} is over the limit of {limit} samples a request "
            "(DIFFPIPE_MAX_SAMPLES; the MLflow model's model_config max_samples): "
            "ask in several requests with different seeds"
        )


class SampleRequest(StrictModel):
    """What to sample. Every sampling knob left None takes the model card's default."""

    sampler: SamplerName | None = None
    steps: int | None = Field(None, ge=1)
    spacing: Spacing | None = None
    guidance_scale: float | None = Field(None, ge=0.0)
    guidance_interval: tuple[float, float] | None = None
    eta: float | None = Field(None, ge=0.0, le=1.0)
    variance: Variance | None = None
    clip_x0: bool | None = None
    num_samples: int | None = Field(None, ge=1)
    labels: tuple[int, ...] | None = None  # one for all samples, or one each
    prompts: tuple[str, ...] | None = None  # text models: samples cycle through these
    seed: int = Field(0, ge=0, lt=MAX_SEED)
    batch_size: int = Field(256, ge=1, le=MAX_BATCH_SIZE)

    @classmethod
    def from_config(cls, sc: SampleConfig, **fields: Any) -> SampleRequest:
        """The pipeline's ``sample:`` section as a request: the knobs it sets explicitly
        override the card, the rest are the card's; ``fields`` set anything else."""
        base = {
            **sc.overrides(),
            "seed": sc.seed,
            "batch_size": sc.batch_size,
            "prompts": sc.prompts or None,
        }
        return cls(**(base | fields))

    def knobs(self, card: ModelCard) -> SamplingDefaults:
        """The sampling knobs of this request: its own where given, else the card's. More steps
        than the model's training timesteps is a ValueError naming both."""
        given = {k: getattr(self, k) for k in SAMPLING_KNOBS if getattr(self, k) is not None}
        knobs = card.sampling.model_copy(update=given)
        if knobs.steps > card.diffusion.num_steps:
            raise ValueError(
                f"steps {knobs.steps} is more than the model's "
                f"{card.diffusion.num_steps} training timesteps"
            )
        return knobs

    def count(self) -> int:
        """How many samples: ``num_samples``, else one per label or prompt given."""
        if self.num_samples is not None:
            return self.num_samples
        given = self.labels or self.prompts
        return len(given) if given else DEFAULT_NUM_SAMPLES


class InpaintRequest(SampleRequest):
    """An inpainting request: RePaint's jump length and resampling count (1 = plain
    replacement). RePaint takes DDPM steps on the grid, so ``sampler`` and ``eta`` do not apply."""

    jump_length: int = Field(10, ge=1)
    resample: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _no_sampler(self) -> InpaintRequest:
        given = [k for k in ("sampler", "eta") if getattr(self, k) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} do not apply to inpainting (RePaint takes DDPM steps); "
                "leave them out"
            )
        return self


@dataclass(frozen=True)
class Samples:
    images: Tensor  # (N, C, H, W) uint8, or (N, C, D, H, W) for volumes
    labels: Tensor | None  # (N,) long, the requested classes
    seeds: Tensor  # (N,) long: sample i's initial noise is drawn from seed[i]
    nfe: int  # network evaluations per sample (guided batches count once)
    knobs: SamplingDefaults  # the sampling settings used
    prompts: list[str] | None = None  # text-conditioned models: sample i's prompt


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float to uint8 pixels, rounding to nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def balanced_labels(n: int, num_classes: int, *, offset: int = 0) -> Tensor:
    """Labels of samples ``offset .. offset + n - 1`` of a run cycling 0, 1, ..., K-1, 0, ...:
    as equal a share per class as the run allows."""
    return (offset + torch.arange(n)) % num_classes


def _initial_noise(seeds: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """x_T for each sample from its own seed, so a sample does not depend on its batch."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device)


def _schedule(card: ModelCard) -> NoiseSchedule:
    return NoiseSchedule.from_name(card.diffusion.schedule, card.diffusion.num_steps)


def _guided(base: Denoiser, cond: Cond, null: Cond, knobs: SamplingDefaults) -> DenoiserFn:
    if knobs.guidance_scale == 1.0:
        return base.with_cond(cond)
    interval = knobs.guidance_interval
    return ClassifierFreeGuidance(base, cond, null, knobs.guidance_scale, interval=interval)


def class_denoiser(
    net: nn.Module, card: ModelCard, knobs: SamplingDefaults, labels: Tensor | None
) -> DenoiserFn:
    """The denoiser for class ``labels`` (None: unconditional), guided at the knobs' scale with
    the null class as the unconditional branch."""
    base = Denoiser(net, _schedule(card), prediction_for(card.diffusion), clip_x0=knobs.clip_x0)
    if labels is None:
        return base
    assert card.num_classes is not None
    null = Cond(labels=torch.full_like(labels, card.num_classes))
    return _guided(base, Cond(labels=labels), null, knobs)


def text_denoiser(
    net: nn.Module,
    card: ModelCard,
    knobs: SamplingDefaults,
    encoder: ClipModel,
    prompts: Sequence[str],
) -> DenoiserFn:
    """The denoiser for ``prompts``; guidance takes the empty prompt as the unconditional branch."""
    assert card.text is not None
    base = Denoiser(net, _schedule(card), prediction_for(card.diffusion), clip_x0=knobs.clip_x0)
    device = next(net.parameters()).device
    use_pooled = card.text.use_pooled
    cond = text_cond(encoder, prompts, use_pooled=use_pooled).to(device)
    null = text_cond(encoder, [NULL_PROMPT] * len(prompts), use_pooled=use_pooled).to(device)
    return _guided(base, cond, null, knobs)


_ENCODERS: dict[str, ClipModel] = {}


def card_text_encoder(card: ModelCard) -> ClipModel:
    """The text encoder a model was trained with, rebuilt from its card and checked against its
    record (:class:`diffusion_core.text.TextEncoderMismatch` otherwise); kept per process, so
    repeated sampling encodes each prompt once."""
    if card.text is None or card.text_encoder is None:
        raise ValueError("this model is not text-conditioned; do not pass prompts")
    key = json.dumps([card.text.model_dump(mode="json"), card.text_encoder], sort_keys=True)
    if key not in _ENCODERS:
        clip = load_text_encoder(card.text, model_config=card.text_encoder.get("model_config"))
        check_encoder(clip, card.text_encoder)
        _ENCODERS[key] = clip
    return _ENCODERS[key]


def request_labels(
    card: ModelCard, request: SampleRequest, n: int, *, offset: int = 0
) -> Tensor | None:
    """The class of each of ``n`` samples: the request's (one for all, or one each), else
    class-balanced for a conditional model; None for an unconditional one."""
    if request.labels is None:
        return (
            None
            if card.num_classes is None
            else balanced_labels(n, card.num_classes, offset=offset)
        )
    if card.num_classes is None:
        raise ValueError("this model is not class-conditional; do not pass class labels")
    labels = torch.tensor(request.labels, dtype=torch.long)
    if len(labels) not in (1, n):
        raise ValueError(f"{len(labels)} labels for {n} samples; give one, or one per sample")
    bad = labels[(labels < 0) | (labels >= card.num_classes)]
    if len(bad):
        raise ValueError(f"class label {int(bad[0])} out of range [0, {card.num_classes})")
    return labels.expand(n).clone() if len(labels) == 1 else labels


def request_prompts(card: ModelCard, request: SampleRequest) -> list[str] | None:
    """The request's prompts for a text model; None for a class model (which takes none)."""
    prompts = list(request.prompts or ())
    if card.text_encoder is None:
        if prompts:
            raise ValueError("this model is not text-conditioned; do not pass prompts")
        return None
    if request.labels is not None:
        raise ValueError("this model is text-conditioned; pass prompts, not class labels")
    if not prompts:
        raise ValueError(
            "this model is text-conditioned: give prompts (sample.prompts or --prompt)"
        )
    return prompts


def prefers_channels_last(net: nn.Module, dtype: torch.dtype | None) -> bool:
    """Whether ``net`` samples faster with its weights in channels-last memory: our U-Net on a
    CPU in fp32, where oneDNN's channels-last convolutions ran 1.1-1.3x faster in 2-D and 1.5x
    in 3-D (in bf16 they ran slower in 2-D, and GPUs are not measured yet: bench/README.md)."""
    return isinstance(net, UNet) and dtype is None and next(net.parameters()).device.type == "cpu"


def sampling_network(
    net: nn.Module,
    dtype: torch.dtype | None,
    *,
    channels_last: bool | None = None,
    compile: bool = False,
) -> nn.Module:
    """The network :func:`generate` samples with: ``net`` itself, or a copy laid out
    channels-last (``channels_last``; None: where :func:`prefers_channels_last`) and compiled
    (``compile``). ``net`` is never changed."""
    laid_out = prefers_channels_last(net, dtype) if channels_last is None else channels_last
    if not (laid_out or compile):
        return net
    fast = copy.deepcopy(net).eval()
    if laid_out:
        fast = fast.to(memory_format=channels_last_format(fast))
    return CompiledForInference(fast) if compile else fast


@torch.no_grad()
def generate(
    net: nn.Module,
    card: ModelCard,
    request: SampleRequest,
    *,
    offset: int = 0,
    encoder: ClipModel | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
) -> Samples:
    """Draw ``request.count()`` samples.

    Sample i starts from the noise of seed ``request.seed * 10**6 + offset + i`` and, for a class
    model without labels, gets class ``(offset + i) % K``, so a run split into shards (each with
    its ``offset``) gives the same images as one call. A text model's sample i gets prompt
    ``(offset + i) % len(prompts)``; ``encoder`` defaults to the model's own. The network runs
    on its own device, under autocast to ``dtype`` when given (``distributed.inference_dtype``),
    and samples a channels-last copy of itself when ``channels_last`` says so (None: when
    :func:`prefers_channels_last`); the caller's network is left as it is. ``compile``
    samples with a :class:`~diffusion_core.unet.CompiledForInference` copy (``torch.compile``
    with frozen weights): faster per step, at a compile time that only a large call repays
    (``runtime.compile``, bench/README.md).
    """
    knobs = request.knobs(card)
    n = request.count()
    prompts = request_prompts(card, request)
    labels = request_labels(card, request, n, offset=offset)
    if prompts is not None:
        encoder = encoder or card_text_encoder(card)
    device = next(net.parameters()).device
    net = sampling_network(net, dtype, channels_last=channels_last, compile=compile)
    schedule = _schedule(card)
    grid = sampling_grid(schedule, knobs.steps, spacing=knobs.spacing)
    seeds = request.seed * 1_000_000 + offset + torch.arange(n)
    per_sample = cycle_prompts(prompts, n, offset=offset) if prompts is not None else None
    out = []
    for start in range(0, n, request.batch_size):
        sl = slice(start, start + request.batch_size)
        x_T = _initial_noise(seeds[sl], card.sample_shape, device)
        gen = torch.Generator(device=device).manual_seed(int(seeds[sl][0]) + 7)
        if per_sample is not None:
            assert encoder is not None
            denoiser = text_denoiser(net, card, knobs, encoder, per_sample[sl])
        else:
            batch_labels = labels[sl].to(device) if labels is not None else None
            denoiser = class_denoiser(net, card, knobs, batch_labels)
        with autocast(device, dtype):
            x0 = run_sampler(
                knobs.sampler,
                denoiser,
                x_T,
                grid,
                schedule,
                generator=gen,
                eta=knobs.eta,
                variance=knobs.variance,
            )
        out.append(to_uint8(x0).cpu())
    nfe = sampler_nfe(knobs.sampler, knobs.steps)
    return Samples(torch.cat(out), labels, seeds, nfe, knobs, per_sample)


@torch.no_grad()
def inpaint(
    net: nn.Module,
    card: ModelCard,
    request: InpaintRequest,
    known: Tensor,
    mask: Tensor,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Fill the region where ``mask`` is 0 in uint8 ``known`` images (B, C, H, W) with RePaint,
    in batches of ``request.batch_size``; the known region of the result is ``known`` exactly.
    ``mask`` is (B or 1, 1, H, W) of {0, 1}."""
    knobs = request.knobs(card)
    labels = request_labels(card, request, len(known)) if request.labels is not None else None
    device = next(net.parameters()).device
    schedule = _schedule(card)
    grid = sampling_grid(schedule, knobs.steps, spacing=knobs.spacing)
    out = []
    for start in range(0, len(known), request.batch_size):
        sl = slice(start, start + request.batch_size)
        batch_labels = labels[sl].to(device) if labels is not None else None
        gen = torch.Generator(device=device).manual_seed(request.seed + start)
        with autocast(device, dtype):
            x0 = repaint(
                class_denoiser(net, card, knobs, batch_labels),
                known[sl].to(device).float() / 127.5 - 1,
                (mask if len(mask) == 1 else mask[sl]).to(device),
                grid,
                schedule,
                generator=gen,
                jump_length=request.jump_length,
                resample=request.resample,
                variance=knobs.variance,
            )
        out.append(to_uint8(x0).cpu())
    return torch.cat(out)


def inpaint_inputs(image: object, mask: object, card: ModelCard) -> tuple[Tensor, Tensor]:
    """Request arrays to (known uint8 (N, C, H, W), mask (N or 1, 1, H, W)).

    ``image``: integers in [0, 255], shaped (H, W), (H, W, C) or (N, H, W, C), at the model's
    size; colour is taken for a one-channel model only when its channels are equal.
    ``mask``: (H, W) for all images or (N, H, W); white (>= 128) or True or >= 0.5 = keep.
    """
    size, channels = card.image_size, card.in_channels
    arr = np.asarray(image)
    if arr.dtype.kind not in "ui" or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"'image' must hold integers in [0, 255], got dtype {arr.dtype}")
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr = arr[None] if arr.ndim == 3 else arr
    if arr.ndim != 4 or arr.shape[1:3] != (size, size) or arr.shape[3] not in (1, 3):
        raise ValueError(
            f"'image' must be (H, W), (H, W, C) or (N, H, W, C) with H = W = {size} and C in "
            f"(1, 3), got shape {np.asarray(image).shape}"
        )
    arr = arr.astype(np.uint8)
    if arr.shape[3] != channels:
        arr = (
            np.repeat(arr, 3, axis=3)
            if channels == 3
            else to_grey(arr, where="'image'", exact=True)
        )
    known = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)  # (N, C, H, W)
    m = np.asarray(mask)
    m = m[None] if m.ndim == 2 else m
    if m.ndim != 3 or m.shape[1:] != (size, size) or len(m) not in (1, len(known)):
        raise ValueError(
            f"'mask' must be (H, W) or (N, H, W) matching 'image' {tuple(known.shape)}, "
            f"got shape {np.asarray(mask).shape}"
        )
    return known, torch.cat([read_mask(mi) for mi in m])
