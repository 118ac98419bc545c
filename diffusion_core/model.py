"""The model card and checkpoints.

A :class:`ModelCard` is what it takes to rebuild a network from code and to sample it as its
trainer meant: the ``model``, ``diffusion`` and ``text`` sections, the data's shape and class
names, the dataset's sha256, the text encoder's record and the default sampling knobs. A
checkpoint carries the card, never the pipeline's sampling counts, safety, evaluation or storage
settings, so changing those never touches a trained model.

A checkpoint is a directory (``card.json``, ``weights.safetensors``, ``ema.safetensors``,
``state.pt``) written atomically under ``root/step-NNNNNNN`` with ``root/latest`` naming the
newest. Weights are safetensors and ``state.pt`` (optimizer, step, random generators) is loaded
with ``weights_only=True``: nothing in a checkpoint is executed. Checkpoints written before the
card (a ``config.json`` holding the whole run config) still load: their card is read out of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffusion_core.config import (
    DiffusionConfig,
    ModelConfig,
    SamplingDefaults,
    StrictModel,
    TextConfig,
)
from diffusion_core.io import atomic_dir, fsync_dir
from diffusion_core.unet import UNet

CARD_FILE = "card.json"
LEGACY_CONFIG_FILE = "config.json"  # checkpoints written before the model card
LATEST = "latest"
CARD_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing files, a malformed card, corrupt weights or
    state; the message names the file."""


# The card fields that must agree for one model's weights to start another's training.
WEIGHT_FIELDS = (
    "model",
    "diffusion",
    "text",
    "text_encoder",
    "in_channels",
    "image_size",
    "num_classes",
    "class_names",
)


class ModelCard(StrictModel):
    """What rebuilds the network and how it samples by default."""

    card_version: int = CARD_VERSION
    model: ModelConfig
    diffusion: DiffusionConfig
    text: TextConfig | None = None
    sampling: SamplingDefaults = SamplingDefaults()
    in_channels: int = Field(ge=1)
    image_size: int = Field(ge=1)
    class_names: tuple[str, ...] = ()
    num_classes: int | None = Field(None, ge=1)
    dataset_sha256: str
    text_encoder: dict[str, Any] | None = None  # diffusion_core.text.encoder_record

    @property
    def dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.model.dims

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample: (C, H, W) or (C, D, H, W)."""
        return (self.in_channels, *[self.image_size] * self.dims)

    def differences(self, other: ModelCard) -> list[str]:
        """What keeps ``other``'s weights from starting this network's training: the fields
        (``model.base_channels``, ``class_names``, ...) in which the two cards differ, sampling
        defaults and the training data aside."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        out = []
        for key in WEIGHT_FIELDS:
            a, b = mine.get(key), theirs.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                out += [f"{key}.{k}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
            elif a != b:
                out.append(key)
        return out

    def with_sampling(self, sampling: SamplingDefaults) -> ModelCard:
        return self.model_copy(update={"sampling": sampling})

    def build(self) -> UNet:
        """The network this card describes, freshly initialised; it predicts as many channels
        as it takes in."""
        m = self.model
        return UNet(
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            image_size=self.image_size,
            base_channels=m.base_channels,
            channel_mults=tuple(m.channel_mults),
            num_res_blocks=m.num_res_blocks,
            attention_resolutions=tuple(m.attention_resolutions),
            num_heads=m.num_heads,
            dropout=m.dropout,
            num_classes=self.num_classes if m.class_conditional else None,
            context_dim=m.context_dim,
            dims=m.dims,
        )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<card>") -> ModelCard:
        """A card from its JSON form, or from a pre-card checkpoint's ``config.json``."""
        if isinstance(data, dict) and "config" in data and "card_version" not in data:
            data = _legacy_card(data)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<top level>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise CheckpointError(f"{source}: not a model card ({problems})") from None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the model card ({exc})") from None
        return cls.from_dict(data, source=str(path))


def _legacy_card(data: dict[str, Any]) -> dict[str, Any]:
    """The card inside a checkpoint written before cards: its ``config.json`` held the whole
    run config; only the model, diffusion, text and sampling knobs are read from it."""
    config = data.get("config") or {}
    sample = config.get("sample") or {}
    return {
        "model": config.get("model", {}),
        "diffusion": config.get("diffusion", {}),
        "text": config.get("text"),
        "sampling": {k: v for k, v in sample.items() if k in SamplingDefaults.model_fields},
        **{
            k: data.get(k)
            for k in ("in_channels", "image_size", "class_names", "num_classes", "dataset_sha256")
        },
        "text_encoder": data.get("text_encoder"),
    }


# ----------------------------------------------------------------------------------------------
# Checkpoint directories.


def write_checkpoint(
    root: Path,
    step: int,
    *,
    card: ModelCard,
    weights: dict[str, Tensor],
    ema: dict[str, Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step-XXXXXXX/`` atomically, point ``root/latest`` at it and keep the newest
    ``keep`` steps."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(
            {k: v.contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors"
        )
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        (tmp / CARD_FILE).write_text(card.to_json())
        torch.save(state, tmp / "state.pt")
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory: ``path`` itself, or the one its ``latest`` pointer names."""
    path = Path(path)
    if path.is_dir() and (path / LATEST).is_file():
        resolved = latest_checkpoint(path)
        assert resolved is not None
        return resolved
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return path


def card_file(checkpoint: Path) -> Path:
    """The card of a checkpoint directory (``card.json``, or a pre-card ``config.json``)."""
    for name in (CARD_FILE, LEGACY_CONFIG_FILE):
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise CheckpointError(f"{checkpoint}: not a checkpoint (no {CARD_FILE})")


def read_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A safetensors file; CheckpointError naming it when it is missing or corrupt."""
    try:
        return load_file(Path(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's ``state.pt``, loaded with ``weights_only=True`` (nothing in it runs);
    CheckpointError naming the file when it is corrupt or holds anything but tensors and
    plain containers."""
    try:
        state = torch.load(Path(path), weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a loadable training state ({type(exc).__name__}: {first})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a training state must be a mapping")
    return state


def load_network(card: ModelCard, weights_file: str | os.PathLike[str]) -> UNet:
    """The card's network with the weights of ``weights_file``, in eval mode."""
    net = card.build()
    try:
        net.load_state_dict(read_weights(weights_file))
    except RuntimeError as exc:  # missing or unexpected keys, shapes that differ
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{weights_file}: weights do not fit the model card ({first})"
        ) from None
    return net.eval()


def load_model(path: str | os.PathLike[str], *, use_ema: bool = True) -> tuple[UNet, ModelCard]:
    """Rebuild a network from a checkpoint directory (weights, not pickles)."""
    checkpoint = resolve_checkpoint(path)
    card = ModelCard.read(card_file(checkpoint))
    weights = checkpoint / ("ema.safetensors" if use_ema else "weights.safetensors")
    return load_network(card, weights), card
