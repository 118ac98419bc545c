"""Text conditioning on open_clip: the encoder, loaded only from places the configuration names;
prompt tables; the empty-prompt null condition.

One loader (:func:`load_clip`) serves text conditioning (token states for the U-Net's
cross-attention, pooled embeddings for the time embedding) and the safety filter's concept
detector (image and text embeddings compared by cosine similarity).

Where the architecture comes from (``model``): a built-in open_clip name (``ViT-B-32``); a JSON
file with an open_clip model config (``configs/clip/tiny-clip.json``), whose file stem becomes the
model name; or ``local-dir:/path`` (open_clip's own folder layout).

Where the weights come from (``pretrained``): ``None`` gives random initialisation (offline tests,
and models trained from scratch with a frozen random text encoder); a local file or any fsspec URL
is copied to a local cache first (``diffusion_core.io.fetch_weights``), its sha256 recorded and,
when ``sha256`` is given, checked; an open_clip pretrained tag is fetched from the hub, and only
when ``allow_download`` is set, because nothing is fetched at run time unless configured.

The U-Net's cross-attention reads the encoder's token states (``Cond.context``, (B, L, width)) and,
with ``text.use_pooled``, its pooled embedding joins the time embedding (``Cond.pooled``). The
empty prompt ``""`` is the null condition: prompt dropout in training replaces captions by it, and
classifier-free guidance uses its embedding as the unconditional branch. A checkpoint records which
encoder it was trained with (:func:`encoder_record`), so sampling rebuilds the same encoder and
refuses a different one (:class:`TextEncoderMismatch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_core.config import TextConfig, diffpipe_home
from diffusion_core.io import WeightsError, fetch_weights
from diffusion_core.parameterization import Cond

log = logging.getLogger(__name__)


class ClipError(ValueError):
    """A CLIP model or its weights could not be found, fetched or verified."""


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
        return self._widths[0]

    @property
    def embed_dim(self) -> int:
        """Width of the pooled embedding."""
        return self._widths[1]

    @cached_property
    def _widths(self) -> tuple[int, int]:
        tokens, pooled = self._encode_new([""])
        return int(tokens.shape[-1]), int(pooled.shape[-1])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ClipModel:
        """This model on ``device`` (embeddings still come back on the CPU)."""
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (the text tower's last block through its final norm, (B, L, width)) and
        the pooled, projected embedding (B, dim) in one pass of open_clip's
        ``forward_intermediates``, which every text tower with its own transformer provides
        (``CLIP``, ``CustomTextCLIP``, SigLIP) in its own dtype."""
        try:
            out = self.model.forward_intermediates(
                text=self.tokenizer(prompts).to(self.device),
                text_indices=1,
                normalize_intermediates=True,
                normalize=False,
            )
        except (AttributeError, NotImplementedError, AssertionError) as exc:
            raise ClipError(
                f"CLIP model {self.name}: its text tower gives no token states "
                f"({type(exc).__name__}: {exc})"
            ) from None
        tokens, pooled = out["text_intermediates"][-1], out["text_features"]
        return tokens.float().cpu(), pooled.float().cpu()

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
            x = chunk.to(self.device).float() / 255
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True
            ).clamp(0, 1)
            x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
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
        try:
            path, digest = fetch_weights(
                pretrained,
                cache_dir or diffpipe_home() / "cache" / "clip",
                expected_sha256=sha256,
                what="CLIP weights",
            )
        except WeightsError as exc:
            raise ClipError(str(exc)) from None
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


# ----------------------------------------------------------------------------------------------
# Text conditioning.

NULL_PROMPT = ""


class TextEncoderMismatch(ValueError):
    """The text encoder found at sampling time is not the one the model was trained with."""


def state_fingerprint(clip: ClipModel) -> str:
    """sha256 over the encoder's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, value in sorted(clip.model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_text_encoder(tc: TextConfig, *, model_config: dict[str, Any] | None = None) -> ClipModel:
    """The frozen encoder ``tc`` names; random weights are drawn from ``tc.seed``.

    ``model_config`` (a checkpoint's copy of a JSON model config) stands in for ``tc.model`` when
    that is a JSON file, so a model trained from ``configs/clip/x.json`` samples anywhere.
    """
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        model = tc.model
        if model_config is not None and model.endswith(".json"):
            model = str(Path(tmp) / Path(model).name)
            Path(model).write_text(json.dumps(model_config))
        torch.manual_seed(tc.seed)
        return load_clip(model, tc.pretrained, sha256=tc.sha256, allow_download=tc.download)


def encoder_record(clip: ClipModel, tc: TextConfig) -> dict[str, Any]:
    """What a checkpoint keeps about its encoder (``ModelSpec.text_encoder``)."""
    record: dict[str, Any] = {
        "model": clip.name,
        "weights_sha256": clip.weights_sha256,
        "state_sha256": state_fingerprint(clip),
        "context_dim": clip.context_dim,
        "embed_dim": clip.embed_dim,
    }
    if tc.model.endswith(".json"):
        record["model_config"] = json.loads(Path(tc.model).expanduser().read_text())
    return record


def check_encoder(clip: ClipModel, record: dict[str, Any]) -> None:
    """Raise :class:`TextEncoderMismatch` unless ``clip`` is the encoder ``record`` describes."""
    found = {"model": clip.name, "state_sha256": state_fingerprint(clip)}
    for key, value in found.items():
        if record.get(key) != value:
            raise TextEncoderMismatch(
                f"text encoder {key} is {value}, but the model was trained with "
                f"{record.get(key)} (weights sha256 {record.get('weights_sha256')}); "
                "point text.pretrained at the weights it was trained with"
            )


def resolve_context_dim(cfg_context_dim: int | None, clip: ClipModel, tc: TextConfig) -> int:
    """The U-Net's ``context_dim``: the encoder's width (a configured value must agree)."""
    if cfg_context_dim is not None and cfg_context_dim != clip.context_dim:
        raise ClipError(
            f"model.context_dim={cfg_context_dim} but text encoder {clip.name} has width "
            f"{clip.context_dim}; leave model.context_dim unset"
        )
    if tc.use_pooled and clip.embed_dim != clip.context_dim:
        raise ClipError(
            f"text.use_pooled needs the pooled embedding ({clip.embed_dim}) as wide as the token "
            f"states ({clip.context_dim}) of {clip.name}; set text.use_pooled: false"
        )
    return clip.context_dim


def text_cond(clip: ClipModel, prompts: Sequence[str], *, use_pooled: bool) -> Cond:
    """The conditioning for ``prompts``: token states, and the pooled embedding when used.

    Without ``use_pooled`` the pooled input is zero, so the time embedding sees no prompt.
    """
    emb = clip.encode_text(list(prompts))
    pooled = emb.pooled if use_pooled else torch.zeros_like(emb.tokens[:, 0])
    return Cond(context=emb.tokens, pooled=pooled)


def cycle_prompts(prompts: Sequence[str], n: int, *, offset: int = 0) -> list[str]:
    """Prompts for samples ``offset .. offset + n - 1`` of a run cycling through ``prompts``."""
    if not prompts:
        raise ValueError("no prompts given for a text-conditioned model")
    return [prompts[(offset + i) % len(prompts)] for i in range(n)]


@dataclass(frozen=True)
class PromptTable:
    """Every distinct caption of a dataset encoded once, plus the null prompt.

    Training gathers rows of ``tokens``/``pooled`` by index instead of running the encoder each
    step; row ``null`` holds the empty prompt's embedding.
    """

    tokens: Tensor  # (U + 1, L, width)
    pooled: Tensor  # (U + 1, width) or zeros when the pooled embedding is not used
    index: Tensor  # (N,) long: row of each dataset item
    null: int

    @classmethod
    def build(
        cls, clip: ClipModel, captions: Sequence[str], *, use_pooled: bool, batch_size: int = 256
    ) -> PromptTable:
        distinct = list(dict.fromkeys([NULL_PROMPT, *captions]))
        rows = {p: i for i, p in enumerate(distinct)}
        conds = [
            text_cond(clip, distinct[i : i + batch_size], use_pooled=use_pooled)
            for i in range(0, len(distinct), batch_size)
        ]
        tokens = torch.cat([c.context for c in conds if c.context is not None])
        pooled = torch.cat([c.pooled for c in conds if c.pooled is not None])
        index = torch.tensor([rows[c] for c in captions], dtype=torch.long)
        return cls(tokens=tokens, pooled=pooled, index=index, null=rows[NULL_PROMPT])

    def to(self, device: torch.device) -> PromptTable:
        return PromptTable(self.tokens.to(device), self.pooled.to(device), self.index, self.null)

    def rows(self, idx: Tensor, *, dropout: float, generator: torch.Generator) -> Tensor:
        """Table rows for dataset items ``idx``; each is the null row with probability
        ``dropout`` (classifier-free guidance training, Ho & Salimans 2022)."""
        rows = self.index[idx.cpu()].to(generator.device)
        drop = torch.rand(rows.shape, generator=generator, device=generator.device) < dropout
        return torch.where(drop, torch.full_like(rows, self.null), rows)

    def cond(self, rows: Tensor) -> Cond:
        rows = rows.to(self.tokens.device)
        return Cond(context=self.tokens[rows], pooled=self.pooled[rows])
