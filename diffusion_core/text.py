"""Text conditioning: a frozen open_clip text encoder, prompt tables and the empty-prompt null.

The U-Net's cross-attention reads the encoder's token states (``Cond.context``, (B, L, width)) and,
with ``text.use_pooled``, its pooled embedding joins the time embedding (``Cond.pooled``). The
empty prompt ``""`` is the null condition: prompt dropout in training replaces captions by it, and
classifier-free guidance uses its embedding as the unconditional branch.

A checkpoint records which encoder it was trained with (:func:`encoder_record`): the open_clip
model, the weights file's sha256 and a fingerprint of the encoder's state, so sampling rebuilds
the same encoder and refuses a different one (:class:`TextEncoderMismatch`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_core.clip import ClipError, ClipModel, load_clip
from diffusion_core.config import TextConfig
from diffusion_core.parameterization import Cond

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
