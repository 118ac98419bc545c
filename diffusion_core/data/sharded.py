"""A dataset read from its stored shards as it is needed.

The dataset stage stores each split as safetensors shards (``images`` uint8 and, when labelled,
``labels`` int64). Training reads them through :class:`ShardedDataset`: only the labels (8 bytes an
item) and the captions are held in memory; the images of each batch are read from the files with
plain reads (no memory map), so the memory a training process holds does not grow with the
dataset, and each rank of a distributed run reads only its own part of every batch.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion_core.data.dataset import DatasetError

_DTYPES = {"U8": (np.uint8, 1), "I64": (np.int64, 8)}


@dataclass(frozen=True)
class _Tensor:
    """Where a tensor's bytes are in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte

    @property
    def item_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * _DTYPES[self.dtype][1]


def _header(path: Path) -> dict[str, _Tensor]:
    """The tensors of a safetensors file: 8 bytes of header length, a JSON header, the data."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header: dict[str, Any] = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable dataset shard ({exc})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise DatasetError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}")
        out[name] = _Tensor(
            info["dtype"], tuple(info["shape"]), 8 + length + info["data_offsets"][0]
        )
    if "images" not in out:
        raise DatasetError(f"{path}: no 'images' tensor")
    return out


def _read_tensor(path: Path, tensor: _Tensor) -> Tensor:
    dtype, size = _DTYPES[tensor.dtype]
    count = int(np.prod(tensor.shape, dtype=np.int64))
    with open(path, "rb") as f:
        f.seek(tensor.start)
        data = np.frombuffer(f.read(count * size), dtype=dtype)
    return torch.from_numpy(data.copy()).reshape(tensor.shape)


class ShardedDataset:
    """Items of one split, read from local shard files on demand (``read``), with the labels and
    captions in memory. ``sha256`` is the dataset's identity as the dataset stage computed it."""

    def __init__(
        self,
        files: list[Path],
        *,
        class_names: list[str],
        captions: list[str] | None,
        sha256: str,
        source: str,
    ) -> None:
        if not files:
            raise DatasetError(f"{source}: no shards")
        self.files = [Path(f) for f in files]
        self._images = [_header(f)["images"] for f in self.files]
        shapes = {t.shape[1:] for t in self._images}
        if len(shapes) != 1 or any(t.dtype != "U8" for t in self._images):
            raise DatasetError(f"{source}: shards hold images of other shapes or dtypes {shapes}")
        self._ends = list(np.cumsum([t.shape[0] for t in self._images]))
        labels = []
        for f in self.files:
            found = _header(f).get("labels")
            if found is not None:
                labels.append(_read_tensor(f, found))
        if labels and len(labels) != len(self.files):
            raise DatasetError(f"{source}: some shards have labels and some do not")
        self.labels: Tensor | None = torch.cat(labels) if labels else None
        self.class_names = list(class_names)
        self.captions = captions
        self.source = source
        self._sha256 = sha256
        if captions is not None and len(captions) != len(self):
            raise DatasetError(f"{source}: {len(captions)} captions for {len(self)} images")

    def __len__(self) -> int:
        return int(self._ends[-1])

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self._images[0].shape[1:]

    def sha256(self) -> str:
        return self._sha256

    def read(self, indices: Tensor) -> Tensor:
        """The images at ``indices`` (in that order) as uint8 (B, *item_shape)."""
        item = self._images[0].item_bytes
        out = np.empty((len(indices), item), dtype=np.uint8)
        by_file: dict[int, list[tuple[int, int]]] = {}
        for row, i in enumerate(indices.tolist()):
            if not 0 <= i < len(self):
                raise IndexError(f"item {i} of a dataset of {len(self)}")
            k = bisect.bisect_right(self._ends, i)
            first = self._ends[k - 1] if k else 0
            by_file.setdefault(k, []).append((row, i - first))
        for k, wanted in by_file.items():
            start = self._images[k].start
            with open(self.files[k], "rb", buffering=0) as f:
                for row, j in sorted(wanted, key=lambda rj: rj[1]):
                    out[row] = np.frombuffer(os.pread(f.fileno(), item, start + j * item), np.uint8)
        return torch.from_numpy(out).reshape(len(indices), *self.item_shape)
