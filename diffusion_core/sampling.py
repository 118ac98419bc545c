"""Sampling a trained network: build the denoiser, wrap it for guidance, run a sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_core.config import SampleConfig
from diffusion_core.guidance import ClassifierFreeGuidance, inpaint
from diffusion_core.parameterization import PREDICTIONS, Cond, Denoiser, DenoiserFn
from diffusion_core.samplers import run_sampler
from diffusion_core.schedules import NoiseSchedule, timestep_grid
from diffusion_core.training import ModelSpec


@dataclass(frozen=True)
class Samples:
    images: Tensor  # (N, C, H, W) uint8, or (N, C, D, H, W) for volumes
    labels: Tensor | None  # (N,) long, the requested classes
    seeds: Tensor  # (N,) long: sample i's initial noise is drawn from seed[i]
    nfe: int  # network evaluations per sample (guided batches count once)


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
    device: torch.device | None = None,
    offset: int = 0,
) -> Samples:
    """Draw ``num_samples`` images (class-balanced for conditional models unless ``labels``).

    Sample i starts from the noise of seed ``sample.seed * 10**6 + offset + i``, so a run split
    into shards (each with its ``offset``) gives the same images as one call.
    """
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
    out = []
    for start in range(0, n, sc.batch_size):
        sl = slice(start, start + sc.batch_size)
        batch_labels = labels[sl].to(device) if labels is not None else None
        x_T = _initial_noise(seeds[sl], shape, device)
        gen = torch.Generator(device=device).manual_seed(int(seeds[sl][0]) + 7)
        x0 = run_sampler(
            sc.sampler,
            _denoiser(net, spec, sc, batch_labels),
            x_T,
            grid,
            schedule,
            generator=gen,
            eta=sc.eta,
            variance=sc.variance,
        )
        out.append(to_uint8(x0).cpu())
    return Samples(images=torch.cat(out), labels=labels, seeds=seeds, nfe=sc.steps)


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
