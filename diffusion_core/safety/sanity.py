"""The sanity detector: images that are not well-formed pixel data or carry no content."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_core.safety.detector import DetectorResult, SafetyContext, check_finite_number


class InvalidImageDetector:
    """Flags images that are not well-formed pixel data or carry no content (config: ``sanity``).

    Flagged, with the reason named:
    - a batch that is not (N, C, H, W) uint8 or floating point, or whose (C, H, W) differs from
      the training images' (every image: ``shape``/``dtype``);
    - float images with NaN or infinite values (``non-finite``), or values outside the model's
      [-1, 1] range by more than ``range_tolerance`` (``out of range``: a sampler that overshot;
      they would be clipped silently when quantised);
    - images whose pixel standard deviation, in grey levels on the 0..255 scale over all C*H*W
      values, is below ``min_std`` (``blank``, ``saturated`` or ``constant``: what a sampler
      that diverged produces once quantised to uint8);
    - images with more than ``max_clipped_fraction`` of their values at the ends of the range
      (0 or 255; ``saturated``): binary noise, which has a large std but no content.

    ``min_std=2.0`` grey levels: a flat image has std 0 and a nearly flat one rounded to uint8
    stays below 1, while real images have texture far above it (the scikit-learn digits have a
    per-image std of at least 60 at every size). ``max_clipped_fraction=0.95``: digits, whose
    background is black, have at most 62.5% of their pixels at 0 or 255. Scores are the std (0
    for images that cannot be measured); lower is worse.
    """

    name = "sanity"

    def __init__(
        self,
        *,
        min_std: float = 2.0,
        max_clipped_fraction: float = 0.95,
        range_tolerance: float = 1e-3,
    ) -> None:
        self.min_std = check_finite_number(min_std, "sanity: min_std", low=0.0)
        self.max_clipped_fraction = check_finite_number(
            max_clipped_fraction, "sanity: max_clipped_fraction", low=0.0, high=1.0
        )
        self.range_tolerance = check_finite_number(
            range_tolerance, "sanity: range_tolerance", low=0.0
        )

    def _problem(self, images: Tensor, context: SafetyContext) -> str | None:
        """What is wrong with the batch as a whole, if anything."""
        if images.ndim != 4 or 0 in images.shape[1:]:
            return f"invalid shape {tuple(images.shape)}, expected (N, C, H, W)"
        if images.dtype != torch.uint8 and not images.is_floating_point():
            return f"invalid dtype {images.dtype}, expected uint8"
        train = context.train_images
        if train is not None and tuple(train.shape[1:]) != tuple(images.shape[1:]):
            return (
                f"wrong shape: images are {tuple(images.shape[1:])}, training images "
                f"{tuple(train.shape[1:])}"
            )
        return None

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        n = int(images.shape[0]) if images.ndim >= 1 else 0
        problem = self._problem(images, context)
        if problem is not None:
            return DetectorResult(
                scores=torch.zeros(n),
                flagged=torch.ones(n, dtype=torch.bool),
                reasons=[problem] * n,
                threshold=self.min_std,
            )

        flat = images.detach().flatten(1)
        bad_values = (~torch.isfinite(flat)).sum(dim=1).cpu()  # always 0 for uint8
        finite = torch.nan_to_num(flat.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if images.is_floating_point():
            out_of_range = (finite.abs() > 1.0 + self.range_tolerance).sum(dim=1).cpu()
            grey = ((finite.clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # as it would be stored
        else:
            out_of_range = torch.zeros(n, dtype=torch.long)
            grey = finite
        stds = grey.std(dim=1, correction=0).cpu()
        stds[bad_values > 0] = 0.0
        means = grey.mean(dim=1).cpu()
        clipped = ((grey <= 0.0) | (grey >= 255.0)).float().mean(dim=1).cpu()
        reasons: list[str | None] = []
        for bad, over, std, mean, ends in zip(
            bad_values.tolist(),
            out_of_range.tolist(),
            stds.tolist(),
            means.tolist(),
            clipped.tolist(),
            strict=True,
        ):
            if bad:
                reasons.append(f"non-finite: {bad} NaN/inf pixel values")
            elif over:
                reasons.append(f"out of range: {over} values outside [-1, 1]")
            elif std < self.min_std:
                kind = "blank" if mean < 1.0 else "saturated" if mean > 254.0 else "constant"
                reasons.append(f"{kind}: pixel std {std:.1f} < {self.min_std:g}")
            elif ends > self.max_clipped_fraction:
                reasons.append(
                    f"saturated: {ends:.1%} of values at 0 or 255 > {self.max_clipped_fraction:.0%}"
                )
            else:
                reasons.append(None)
        flagged = torch.tensor([r is not None for r in reasons], dtype=torch.bool)
        return DetectorResult(scores=stds, flagged=flagged, reasons=reasons, threshold=self.min_std)
