"""Images and volumes: the only place where the pipeline's stages treat them differently.

A :class:`Modality` says how samples of its kind are stored beside the common tensors, what the
2-D safety detectors look at, which metrics join the common FID/KID/precision-recall record, and
which figures the report shows. Stages look the modality up by the data's dimensionality
(:func:`modality`) and never branch on tensor shapes themselves; a new modality is one class here
plus its data source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from torch import Tensor

from diffusion_core.config import SafetyConfig
from diffusion_core.data.dataset import ImageDataset
from diffusion_core.data.volumes import ReportFigure, max_projections, report_views
from diffusion_core.evaluation.judge import TrainedClassifier
from diffusion_core.evaluation.volumes import volume_statistics


class Modality(Protocol):
    name: str
    dims: int

    def write_extras(self, images: Tensor, out: Path) -> None:
        """Files a sample shard holds besides ``images.safetensors``."""

    def safety_view(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) images the 2-D safety detectors judge."""

    def safety_config(self, safety: SafetyConfig) -> SafetyConfig:
        """The configured chain as it runs on :meth:`safety_view`."""

    def judge_reads_views(self) -> bool:
        """Whether the domain classifier reads the safety views (feature-space memorisation)."""

    def extra_metrics(
        self, images: Tensor, labels: Tensor | None, holdout: ImageDataset, judge: TrainedClassifier
    ) -> dict[str, float]:
        """Metrics of this modality beside FID, KID, IS, precision/recall and accuracy."""

    def report_samples(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) views for the report's sample grid."""

    def report_real(self, holdout: ImageDataset) -> Tensor | None:
        """Real images for the forward-process figure (None: not shown)."""

    def report_figures(
        self, images: Tensor, labels: Tensor | None, holdout: ImageDataset
    ) -> list[ReportFigure]:
        """The report's extra figures."""


class Images:
    """uint8 (N, C, H, W) samples: judged, evaluated and shown as they are."""

    name, dims = "images", 2

    def write_extras(self, images: Tensor, out: Path) -> None:
        return None

    def safety_view(self, images: Tensor) -> Tensor:
        return images

    def safety_config(self, safety: SafetyConfig) -> SafetyConfig:
        return safety

    def judge_reads_views(self) -> bool:
        return True

    def extra_metrics(
        self, images: Tensor, labels: Tensor | None, holdout: ImageDataset, judge: TrainedClassifier
    ) -> dict[str, float]:
        return {}

    def report_samples(self, images: Tensor) -> Tensor:
        return images

    def report_real(self, holdout: ImageDataset) -> Tensor | None:
        return holdout.images[:6]

    def report_figures(
        self, images: Tensor, labels: Tensor | None, holdout: ImageDataset
    ) -> list[ReportFigure]:
        return []


class Volumes:
    """uint8 (N, C, D, H, W) samples: also stored as ``.npy``; the 2-D detectors judge their
    maximum-intensity projections (memorisation in pixel space: the domain classifier is a 3-D
    network); evaluation adds occupancy and shape statistics; the report shows projections and
    mid-slices."""

    name, dims = "volumes", 3

    def write_extras(self, images: Tensor, out: Path) -> None:
        np.save(out / "volumes.npy", images.numpy())

    def safety_view(self, images: Tensor) -> Tensor:
        return max_projections(images)

    def safety_config(self, safety: SafetyConfig) -> SafetyConfig:
        detectors = tuple(
            d.model_copy(update={"params": {**d.params, "feature_space": False}})
            if d.name == "memorisation"
            else d
            for d in safety.detectors
        )
        return safety.model_copy(update={"detectors": detectors})

    def judge_reads_views(self) -> bool:
        return False

    def extra_metrics(
        self, images: Tensor, labels: Tensor | None, holdout: ImageDataset, judge: TrainedClassifier
    ) -> dict[str, float]:
        return volume_statistics(images, labels, holdout, judge)

    def report_samples(self, images: Tensor) -> Tensor:
        return images.amax(dim=2)  # projections along z

    def report_real(self, holdout: ImageDataset) -> Tensor | None:
        return None

    def report_figures(
        self, images: Tensor, labels: Tensor | None, holdout: ImageDataset
    ) -> list[ReportFigure]:
        return report_views(images, labels, holdout)


MODALITIES: dict[int, Modality] = {2: Images(), 3: Volumes()}


def modality(dims: int) -> Modality:
    """The modality of data with ``dims`` spatial dimensions (2 images, 3 volumes)."""
    try:
        return MODALITIES[dims]
    except KeyError:
        raise ValueError(f"no modality for {dims}-D data (known: {sorted(MODALITIES)})") from None
