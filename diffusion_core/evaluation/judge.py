"""The judge: a small CNN classifier trained on a dataset's own images. It judges conditional
accuracy, and its penultimate layer is the feature space of FID, KID and precision/recall when no
Inception weights are at hand (and always for volumes). An unlabelled dataset (a flat folder)
gets a judge all the same: one that tells how far each image was turned (:func:`rotations`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffusion_core.data.dataset import ImageDataset


class SmallCNN(nn.Module):
    """Two conv layers and a 64-d penultimate layer (the features); 2-D for images, 3-D (Conv3d,
    MaxPool3d) for volumes with ``dims=3``."""

    def __init__(
        self, *, in_channels: int, image_size: int, num_classes: int, width: int = 32, dims: int = 2
    ):
        super().__init__()
        self.shape = {
            "in_channels": in_channels,
            "image_size": image_size,
            "num_classes": num_classes,
            "width": width,
            "dims": dims,
        }
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
        self.body = nn.Sequential(
            conv(in_channels, width, 3, padding=1),
            nn.ReLU(),
            pool(2),
            conv(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            pool(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** dims, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) or (B, C, D, H, W) uint8 -> (B, 64) features."""
        return self.body(x.float() / 127.5 - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _shift(x: Tensor, gen: torch.Generator, max_shift: int) -> Tensor:
    """Random translations by up to ``max_shift`` pixels (voxels) along every spatial axis (zero
    padding), one per image; offsets are drawn axis by axis (H, W or D, H, W)."""
    b, c, *spatial = x.shape
    ones = [1] * len(spatial)
    padded = F.pad(x, [max_shift] * 2 * len(spatial))
    index = [torch.arange(b).view(b, 1, *ones), torch.arange(c).view(1, c, *ones)]
    for axis, size in enumerate(spatial):
        offset = torch.randint(0, 2 * max_shift + 1, (b, 1, *ones), generator=gen)
        shape = [1, 1, *ones]
        shape[2 + axis] = size
        index.append(offset + torch.arange(size).view(shape))  # (B, 1, ..., size, ..., 1)
    return padded[tuple(index)]  # (B, C, H, W) or (B, C, D, H, W)


@dataclass(frozen=True)
class TrainedClassifier:
    net: SmallCNN
    holdout_accuracy: float

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> TrainedClassifier:
        """The same classifier on ``device`` (its outputs still come back on the CPU)."""
        return TrainedClassifier(self.net.to(device), self.holdout_accuracy)

    @torch.no_grad()
    def _batches(self, images: Tensor, fn: Callable[[Tensor], Tensor], batch_size: int) -> Tensor:
        """``fn`` over batches of ``images`` on the classifier's device, back on the CPU."""
        self.net.eval()
        return torch.cat([fn(b.to(self.device)).cpu() for b in images.split(batch_size)])

    def predict(self, images: Tensor, *, batch_size: int = 512) -> Tensor:
        return self._batches(images, lambda b: self.net(b).argmax(1), batch_size)

    def logits(self, images: Tensor, *, batch_size: int = 512) -> Tensor:
        return self._batches(images, self.net, batch_size)

    def features(self, images: Tensor, *, batch_size: int = 512) -> Tensor:
        return self._batches(images, self.net.features, batch_size)

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return float((self.predict(images) == labels).float().mean())


def train_classifier(
    train_set: ImageDataset,
    holdout: ImageDataset,
    *,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    width: int | None = None,
    device: torch.device | str = "cpu",
) -> TrainedClassifier:
    """Train on ``train_set`` with small random shifts; report accuracy on ``holdout``.

    Images default to 30 epochs of a width-32 net; volumes (a 3-D net, each item 16-64x the
    voxels of an image) to 10 epochs of a width-8 net, which keeps a 32^3 set to minutes on a CPU.
    """
    if train_set.labels is None or holdout.labels is None:
        raise ValueError("a classifier needs a labelled dataset")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    c, h, dims = train_set.images.shape[1], train_set.images.shape[-1], train_set.dims
    epochs = epochs if epochs is not None else (30 if dims == 2 else 10)
    width = width if width is not None else (32 if dims == 2 else 8)
    net = SmallCNN(
        in_channels=c, image_size=h, num_classes=len(train_set.class_names), width=width, dims=dims
    ).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * int(np.ceil(len(train_set) / batch_size))
    )
    images, labels = train_set.images, train_set.labels
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            x = _shift(images[idx], gen, max_shift=max(1, h // 16)).to(device)
            loss = F.cross_entropy(net(x), labels[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    judge = TrainedClassifier(net.eval(), 0.0)
    accuracy = judge.accuracy(holdout.images, holdout.labels)
    return TrainedClassifier(net.eval().cpu(), accuracy)


ROTATION_CLASSES = ("0", "90", "180", "270")  # degrees, counter-clockwise


def rotations(ds: ImageDataset) -> ImageDataset:
    """Every image four times, turned by 0, 90, 180 and 270 degrees and labelled by the turn:
    the pretext task of Gidaris, Singh & Komodakis (2018), "Unsupervised representation learning
    by predicting image rotations", which needs no labels and whose features follow the images'
    content (which way is up)."""
    turned = [torch.rot90(ds.images, k, dims=(-2, -1)) for k in range(len(ROTATION_CLASSES))]
    return ImageDataset(
        images=torch.cat(turned),  # (4N, C, H, W) or (4N, C, D, H, W)
        labels=torch.arange(len(turned)).repeat_interleave(len(ds)),
        class_names=list(ROTATION_CLASSES),
        source=f"{ds.source} (turned)",
    )


def train_judge(
    train_set: ImageDataset, holdout: ImageDataset, *, device: torch.device | str = "cpu"
) -> TrainedClassifier:
    """The dataset's judge: a classifier of its classes, or, when it has no labels, of the turn
    of its images (:func:`rotations`); its holdout accuracy is on that task."""
    if train_set.labels is None or holdout.labels is None:
        return train_classifier(rotations(train_set), rotations(holdout), device=device)
    return train_classifier(train_set, holdout, device=device)


def save_classifier(clf: TrainedClassifier, out_dir: Path) -> None:
    """Weights as safetensors plus the shape and accuracy needed to rebuild it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.cpu() for k, v in clf.net.state_dict().items()}
    save_file(weights, out_dir / "weights.safetensors")
    meta = {**clf.net.shape, "holdout_accuracy": clf.holdout_accuracy}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def load_classifier(in_dir: Path) -> TrainedClassifier:
    meta = json.loads((in_dir / "meta.json").read_text())
    accuracy = float(meta.pop("holdout_accuracy"))
    net = SmallCNN(**meta)
    net.load_state_dict(load_file(in_dir / "weights.safetensors"))
    return TrainedClassifier(net.eval(), accuracy)
