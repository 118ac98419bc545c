"""Sampling a trained network: build the denoiser, wrap it for guidance, run a sampler."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_core.clip import ClipModel
from diffusion_core.config import SampleConfig
from diffusion_core.guidance import ClassifierFreeGuidance, inpaint
from diffusion_core.parameterization import PREDICTIONS, Cond, Denoiser, DenoiserFn
from diffusion_core.samplers import run_sampler
from diffusion_core.schedules import NoiseSchedule, timestep_grid
from diffusion_core.text import (
    NULL_PROMPT,
    check_encoder,
    cycle_prompts,
    load_text_encoder,
    text_cond,
)
from diffusion_core.training import ModelSpec


@dataclass(frozen=True)
class Samples:
    images: Tensor  # (N, C, H, W) uint8, or (N, C, D, H, W) for volumes
    labels: Tensor | None  # (N,) long, the requested classes
    seeds: Tensor  # (N,) long: sample i's initial noise is drawn from seed[i]
    nfe: int  # network evaluations per sample (guided batches count once)
    prompts: list[str] | None = None  # text-conditioned models: sample i's prompt


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float to uint8 pixels, rounding to nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """0, 1, ..., K-1, 0, 1, ... : as equal a share per class as n allows."""
    return torch.arange(n) % num_classes


def _initial_noise(seeds: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """x_T for each sample from its own seed, so a sample does not depend on its batch."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device)


def _denoiser(
    net: nn.Module, spec: ModelSpec, sc: SampleConfig, labels: Tensor | None
) -> DenoiserFn:
    schedule = NoiseSchedule.from_name(
        spec.config.diffusion.schedule, spec.config.diffusion.num_steps
    )
    base = Denoiser(
        net, schedule, PREDICTIONS[spec.config.diffusion.prediction], clip_x0=sc.clip_x0
    )
    if labels is None:
        return base
    cond = Cond(labels=labels)
    if sc.guidance_scale == 1.0:
        return base.with_cond(cond)
    assert spec.num_classes is not None
    null = Cond(labels=torch.full_like(labels, spec.num_classes))
    return ClassifierFreeGuidance(base, cond, null, sc.guidance_scale)


def _text_denoiser(
    net: nn.Module, spec: ModelSpec, sc: SampleConfig, encoder: ClipModel, prompts: list[str]
) -> DenoiserFn:
    """Prompt-conditioned denoiser; guidance takes the empty prompt as the unconditional branch."""
    schedule = NoiseSchedule.from_name(
        spec.config.diffusion.schedule, spec.config.diffusion.num_steps
    )
    base = Denoiser(
        net, schedule, PREDICTIONS[spec.config.diffusion.prediction], clip_x0=sc.clip_x0
    )
    assert spec.config.text is not None
    use_pooled = spec.config.text.use_pooled
    device = next(net.parameters()).device
    cond = text_cond(encoder, prompts, use_pooled=use_pooled)
    cond = Cond(context=_to(cond.context, device), pooled=_to(cond.pooled, device))
    if sc.guidance_scale == 1.0:
        return base.with_cond(cond)
    null = text_cond(encoder, [NULL_PROMPT] * len(prompts), use_pooled=use_pooled)
    null = Cond(context=_to(null.context, device), pooled=_to(null.pooled, device))
    return ClassifierFreeGuidance(base, cond, null, sc.guidance_scale)


def _to(x: Tensor | None, device: torch.device) -> Tensor | None:
    return None if x is None else x.to(device)


_ENCODERS: dict[str, ClipModel] = {}


def spec_text_encoder(spec: ModelSpec) -> ClipModel:
    """The text encoder a checkpoint was trained with, rebuilt from its config and checked
    against its record (:class:`diffusion_core.text.TextEncoderMismatch` otherwise); kept per
    process, so repeated sampling encodes each prompt once."""
    if spec.config.text is None or spec.text_encoder is None:
        raise ValueError("this model is not text-conditioned; do not pass prompts")
    key = json.dumps([spec.config.text.model_dump(), spec.text_encoder], sort_keys=True)
    if key not in _ENCODERS:
        clip = load_text_encoder(
            spec.config.text, model_config=spec.text_encoder.get("model_config")
        )
        check_encoder(clip, spec.text_encoder)
        _ENCODERS[key] = clip
    return _ENCODERS[key]


def validate_prompts(spec: ModelSpec, labels: Tensor | None, prompts: Sequence[str]) -> None:
    """Prompts only for text-conditioned models, class labels only for the others."""
    if spec.text_encoder is None:
        if prompts:
            raise ValueError("this model is not text-conditioned; do not pass prompts")
        return
    if labels is not None:
        raise ValueError("this model is text-conditioned; pass prompts, not class labels")
    if not prompts:
        raise ValueError(
            "this model is text-conditioned: give prompts (sample.prompts or --prompt)"
        )
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {bad[0]!r}")


def validate_labels(spec: ModelSpec, labels: Tensor | None) -> None:
    if labels is None:
        return
    if spec.num_classes is None:
        raise ValueError("this model is not class-conditional; do not pass class labels")
    bad = labels[(labels < 0) | (labels >= spec.num_classes)]
    if len(bad):
        raise ValueError(f"class label {int(bad[0])} out of range [0, {spec.num_classes})")


@torch.no_grad()
def generate(
    net: nn.Module,
    spec: ModelSpec,
    sc: SampleConfig,
    *,
    num_samples: int | None = None,
    labels: Tensor | None = None,
    prompts: Sequence[str] | None = None,
    encoder: ClipModel | None = None,
    device: torch.device | None = None,
    offset: int = 0,
) -> Samples:
    """Draw ``num_samples`` images (class-balanced for conditional models unless ``labels``).

    Sample i starts from the noise of seed ``sample.seed * 10**6 + offset + i``, so a run split
    into shards (each with its ``offset``) gives the same images as one call. Text-conditioned
    models take ``prompts`` (default ``sample.prompts``); sample i gets prompt
    ``(offset + i) % len(prompts)``. ``encoder`` defaults to the checkpoint's own.
    """
    prompt_list = list(prompts if prompts is not None else sc.prompts)
    if spec.text_encoder is None and prompts is None:
        prompt_list = []  # a class-conditional model ignores sample.prompts
    validate_prompts(spec, labels, prompt_list)
    if prompt_list:
        encoder = encoder or spec_text_encoder(spec)
    n = (
        num_samples
        if num_samples is not None
        else (len(labels) if labels is not None else sc.num_samples)
    )
    device = device or next(net.parameters()).device
    if labels is None and spec.num_classes is not None:
        labels = balanced_labels(n, spec.num_classes)
    validate_labels(spec, labels)
    schedule = NoiseSchedule.from_name(
        spec.config.diffusion.schedule, spec.config.diffusion.num_steps
    )
    grid = timestep_grid(schedule.num_steps, sc.steps, spacing=sc.spacing)
    seeds = sc.seed * 1_000_000 + offset + torch.arange(n)
    shape = (spec.in_channels, *[spec.image_size] * spec.config.model.dims)
    per_sample = cycle_prompts(prompt_list, n, offset=offset) if prompt_list else None
    out = []
    for start in range(0, n, sc.batch_size):
        sl = slice(start, start + sc.batch_size)
        batch_labels = labels[sl].to(device) if labels is not None else None
        x_T = _initial_noise(seeds[sl], shape, device)
        gen = torch.Generator(device=device).manual_seed(int(seeds[sl][0]) + 7)
        if per_sample is not None:
            assert encoder is not None
            denoiser = _text_denoiser(net, spec, sc, encoder, per_sample[sl])
        else:
            denoiser = _denoiser(net, spec, sc, batch_labels)
        x0 = run_sampler(
            sc.sampler,
            denoiser,
            x_T,
            grid,
            schedule,
            generator=gen,
            eta=sc.eta,
            variance=sc.variance,
        )
        out.append(to_uint8(x0).cpu())
    return Samples(
        images=torch.cat(out), labels=labels, seeds=seeds, nfe=sc.steps, prompts=per_sample
    )


@torch.no_grad()
def inpaint_images(
    net: nn.Module,
    spec: ModelSpec,
    sc: SampleConfig,
    known: Tensor,
    mask: Tensor,
    *,
    labels: Tensor | None = None,
    jump_length: int = 10,
    resample: int = 10,
) -> Tensor:
    """Fill the region where ``mask`` is 0 in uint8 ``known`` images (B, C, H, W); RePaint."""
    validate_labels(spec, labels)
    device = next(net.parameters()).device
    schedule = NoiseSchedule.from_name(
        spec.config.diffusion.schedule, spec.config.diffusion.num_steps
    )
    grid = timestep_grid(schedule.num_steps, sc.steps, spacing=sc.spacing)
    x_known = known.to(device).float() / 127.5 - 1
    gen = torch.Generator(device=device).manual_seed(sc.seed)
    x0 = inpaint(
        _denoiser(net, spec, sc, labels.to(device) if labels is not None else None),
        x_known,
        mask.to(device),
        grid,
        schedule,
        generator=gen,
        jump_length=jump_length,
        resample=resample,
        variance=sc.variance,
    )
    return to_uint8(x0).cpu()
