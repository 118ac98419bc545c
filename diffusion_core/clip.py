"""open_clip models, loaded only from places the configuration names.

One loader serves text conditioning (token states for the U-Net's cross-attention, pooled
embeddings for the time embedding) and concept detection (image and text embeddings compared by
cosine similarity).

Where the architecture comes from (``model``):
- a built-in open_clip name (``ViT-B-32``);
- a JSON file with an open_clip model config (``configs/clip/tiny-clip.json``); its file stem
  becomes the model name;
- ``local-dir:/path``: open_clip's own folder layout (``open_clip_config.json`` and weights).

Where the weights come from (``pretrained``):
- ``None``: random initialisation (offline tests, and models trained from scratch with a frozen
  random text encoder); a warning says so;
- a local file, or any fsspec URL (``file://``, ``s3://``, an artefact-store object), copied to a
  local cache first; the file's sha256 is recorded and, when ``sha256`` is given, checked;
- an open_clip pretrained tag (``laion2b_s34b_b79k``): fetched from the hub, and only when
  ``allow_download`` is set, because nothing is fetched at run time unless configured.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


class ClipError(ValueError):
    """A CLIP model or its weights could not be found, fetched or verified."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    from diffusion_core.storage import diffpipe_home

    return diffpipe_home() / "cache" / "clip"


def fetch_weights(url: str, *, cache_dir: Path | None = None) -> Path:
    """A local copy of the weights at ``url`` (a path or any fsspec URL).

    Remote files are copied once into ``cache_dir`` under a name derived from the URL, through a
    temporary file renamed into place, so an interrupted copy never passes for a complete one.
    """
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ClipError(f"CLIP weights {url!r}: no such file")
        return path
    cache = (cache_dir or _cache_dir()) / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache / Path(url.rstrip("/")).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with (
            fsspec.open(url, "rb") as src,
            tempfile.NamedTemporaryFile(dir=cache, delete=False) as dst,
        ):
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
    except (OSError, ValueError) as e:
        raise ClipError(f"CLIP weights {url!r}: cannot fetch ({e})") from e
    os.replace(dst.name, target)
    return target


def _model_name(model: str) -> str:
    """The open_clip name for ``model``, registering a JSON config file first when given one."""
    import open_clip

    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ClipError(f"CLIP model config {model!r}: no such file")
        open_clip.add_model_config(path)
        return path.stem
    if not model.startswith(("local-dir:", "hf-hub:")) and model not in open_clip.list_models():
        raise ClipError(
            f"CLIP model {model!r} is neither a built-in open_clip model, a JSON config file nor "
            "a local-dir: folder"
        )
    return model


def _looks_like_path(pretrained: str) -> bool:
    """A URL, a path (has a separator or a weights suffix) or an existing file, not a hub tag."""
    return (
        "://" in pretrained
        or "/" in pretrained
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
        or Path(pretrained).expanduser().exists()
    )


@dataclass(frozen=True)
class TextEmbedding:
    """Per-prompt text states: ``tokens`` (B, L, width) for cross-attention, ``pooled`` (B, dim)."""

    tokens: Tensor
    pooled: Tensor


class ClipModel:
    """A frozen open_clip model with cached prompt embeddings and uint8 image input."""

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[list[str]], Tensor],
        *,
        name: str,
        weights_sha256: str | None,
    ) -> None:
        # open_clip's CLIP classes are untyped; Any keeps their attributes usable.
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.weights_sha256 = weights_sha256
        visual = self.model.visual
        size = visual.image_size
        self.image_size = size if isinstance(size, int) else int(size[0])
        self.mean = torch.tensor(visual.image_mean or (0.48145466, 0.4578275, 0.40821073))
        self.std = torch.tensor(visual.image_std or (0.26862954, 0.26130258, 0.27577711))
        self._text_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.cache_size = 4096

    @property
    def context_dim(self) -> int:
        """Width of the token states (the U-Net's ``model.context_dim``)."""
        return int(self.model.ln_final.normalized_shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        m = self.model
        text = self.tokenizer(prompts)
        x = m.token_embedding(text) + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        tokens = m.ln_final(x)
        pooled = m.encode_text(text)
        return tokens.float(), pooled.float()

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        """Token states and pooled embeddings of ``prompts``; each distinct prompt is encoded
        once and kept in a bounded cache (prompts repeat across steps, batches and samples)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tokens, pooled = self._encode_new(missing)
            for i, p in enumerate(missing):
                self._text_cache[p] = (tokens[i], pooled[i])
        for p in prompts:
            self._text_cache.move_to_end(p)
        while len(self._text_cache) > max(self.cache_size, len(prompts)):
            self._text_cache.popitem(last=False)
        pairs = [self._text_cache[p] for p in prompts]
        return TextEmbedding(torch.stack([t for t, _ in pairs]), torch.stack([p for _, p in pairs]))

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """L2-normalised joint-space embeddings of ``prompts`` (B, dim)."""
        return F.normalize(self.encode_text(prompts).pooled, dim=-1)

    @torch.no_grad()
    def image_features(self, images: Tensor, *, batch_size: int = 64) -> Tensor:
        """L2-normalised joint-space embeddings of uint8 images (B, 1 or 3, H, W) -> (B, dim).

        Greyscale is repeated to three channels; images are resized (bicubic, antialiased) to the
        model's input size and normalised with its mean and standard deviation.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ClipError(
                f"CLIP image input must be uint8 (B, 1|3, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        out = []
        for chunk in images.split(batch_size):
            x = chunk.float() / 255
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True
            ).clamp(0, 1)
            x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out)


def load_clip(
    model: str,
    pretrained: str | None = None,
    *,
    sha256: str | None = None,
    allow_download: bool = False,
    cache_dir: Path | None = None,
) -> ClipModel:
    """Build the open_clip ``model`` with weights from ``pretrained`` (see the module docstring)."""
    import open_clip

    name = _model_name(model)
    checkpoint: str | None = None
    digest: str | None = None
    if pretrained is None:
        if not name.startswith("local-dir:"):
            log.warning("CLIP %s: no pretrained weights configured; using random weights", name)
    elif _looks_like_path(pretrained):
        path = fetch_weights(pretrained, cache_dir=cache_dir)
        digest = _sha256(path)
        if sha256 is not None and digest != sha256.lower():
            raise ClipError(f"CLIP weights {pretrained!r}: sha256 {digest}, expected {sha256}")
        checkpoint = str(path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ClipError(
                f"CLIP weights {pretrained!r}: not a file, URL or known tag of {name} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
        if not allow_download:
            raise ClipError(
                f"CLIP weights {pretrained!r} is a hub tag and would be downloaded; set "
                "allow_download (config: download: true) or give a local file or URL"
            )
        checkpoint = pretrained
    try:
        net = open_clip.create_model(name, pretrained=checkpoint, device="cpu")
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as e:
        raise ClipError(f"CLIP model {model!r} with weights {pretrained!r}: {e}") from e
    tokenizer = open_clip.get_tokenizer(name)
    return ClipModel(net, tokenizer, name=name, weights_sha256=digest)
