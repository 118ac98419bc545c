"""Datasets: where images and volumes come from, how they are held and split.

:func:`load_dataset` builds the dataset a ``DataConfig`` names, through the :data:`DATASETS`
registry (one loader per ``data.kind``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from diffusion_core.config import DataConfig
from diffusion_core.data.dataset import DatasetError, ImageDataset, split_dataset
from diffusion_core.data.shapes import load_shapes
from diffusion_core.data.sources import (
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_folder,
    load_mnist,
    source_fingerprint,
)
from diffusion_core.data.volumes import synthetic_volumes, volume_folder

__all__ = [
    "DATASETS",
    "DatasetError",
    "ImageDataset",
    "load_dataset",
    "source_fingerprint",
    "split_dataset",
]

logger = logging.getLogger(__name__)

DATASETS: dict[str, Callable[[DataConfig], ImageDataset]] = {
    "digits": load_digits,
    "folder": load_folder,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "shapes": load_shapes,
    "volumes": synthetic_volumes,
    "volume_folder": volume_folder,
}


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the dataset that ``cfg.kind`` names."""
    loader = DATASETS.get(cfg.kind)
    if loader is None:
        raise DatasetError(f"data.kind={cfg.kind!r}: unknown (allowed: {', '.join(DATASETS)})")
    dataset = loader(cfg)
    logger.info(
        "loaded %d images %s from %s (skipped %d)",
        len(dataset),
        tuple(dataset.images.shape[1:]),
        dataset.source,
        dataset.skipped,
    )
    return dataset
