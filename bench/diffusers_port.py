"""Our U-Net and diffusers' UNet2DModel with the same weights: the peer of the sampling
benchmark, built from a layout or a checkpoint's card, our weights ported into it, checked."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_throughput import Layout

from diffusion_core.config import DiffusionConfig, ModelConfig
from diffusion_core.model import ModelCard
from diffusion_core.parameterization import Cond
from diffusion_core.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample

PORT_ATOL = 1e-4  # fp32 network outputs of ours and the ported peer; measured ~1e-6


def card_for(lay: Layout) -> ModelCard:
    """The model card of ``lay``: what the pipeline would build and sample."""
    base = lay.channels[0]
    model = ModelConfig(
        base_channels=base,
        channel_mults=tuple(c // base for c in lay.channels),
        num_res_blocks=lay.num_res_blocks,
        attention_resolutions=lay.attention_resolutions,
        num_heads=lay.num_heads,
        class_conditional=True,
    )
    return ModelCard(
        model=model,
        diffusion=DiffusionConfig(schedule="linear", num_steps=1000, prediction="eps"),
        in_channels=lay.in_channels,
        image_size=lay.size,
        num_classes=lay.num_classes,
        dataset_sha256="bench",
    )


def layout_of(card: ModelCard, base: Layout) -> Layout:
    """The layout of a checkpoint's card (batch, precision and device from ``base``)."""
    m = card.model
    if m.dims != 2 or m.context_dim is not None or card.num_classes is None:
        raise SystemExit("--checkpoint: a class-conditional 2-D image model is needed for guidance")
    return replace(
        base,
        size=card.image_size,
        in_channels=card.in_channels,
        channels=tuple(m.base_channels * k for k in m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        num_classes=card.num_classes,
    )


def port_weights(ours: UNet, peer: nn.Module) -> None:
    """Copy our weights into diffusers' scale-shift UNet2DModel so both compute one function.

    Each of our residual blocks' slice of the shared FiLM projection becomes that block's
    ``time_emb_proj``; the fused qkv splits into ``to_q``, ``to_k``, ``to_v``; the peer's second
    GroupNorm gets the identity affine ours folds into the FiLM. The peer's GroupNorms take our
    group counts, layer by layer (diffusers has one count for every width; ours depends on the
    width, so they differ at 64 channels in the quickstart layout; the cost is the same).
    """
    p: Any = peer
    blocks = [*p.down_blocks, p.mid_block, *p.up_blocks]  # execution order
    peer_of: dict[type, list[nn.Module]] = {
        ResBlock: [r for b in blocks for r in b.resnets],
        AttentionBlock: [a for b in blocks for a in getattr(b, "attentions", None) or []],
        Downsample: [s for b in p.down_blocks for s in getattr(b, "downsamplers", None) or []],
        Upsample: [s for b in p.up_blocks for s in getattr(b, "upsamplers", None) or []],
    }
    pairs: list[tuple[nn.Module, nn.Module]] = [
        (ours.conv_in, p.conv_in),
        (ours.time_mlp[0], p.time_embedding.linear_1),
        (ours.time_mlp[2], p.time_embedding.linear_2),
        (ours.norm_out, p.conv_norm_out),
        (ours.conv_out, p.conv_out),
    ]
    if ours.class_embed is not None:
        pairs.append((ours.class_embed, p.class_embedding))
    for kind, theirs in peer_of.items():
        pairs += zip([m for m in ours.modules() if isinstance(m, kind)], theirs, strict=True)
    film_w = ours.film.weight.split(ours.film_sizes)
    film_b = ours.film.bias.split(ours.film_sizes)
    res_index = 0
    with torch.no_grad():
        for mine, their in pairs:
            if isinstance(mine, ResBlock):
                for a, b in [(mine.norm1, their.norm1), (mine.conv1, their.conv1)]:
                    b.load_state_dict(a.state_dict())
                their.conv2.load_state_dict(mine.conv2.state_dict())
                if isinstance(mine.skip, nn.Conv2d):
                    their.conv_shortcut.load_state_dict(mine.skip.state_dict())
                their.norm2.weight.fill_(1.0)
                their.norm2.bias.zero_()
                their.norm1.num_groups = mine.norm1.num_groups
                their.norm2.num_groups = mine.norm2.num_groups
                their.time_emb_proj.weight.copy_(film_w[res_index])
                their.time_emb_proj.bias.copy_(film_b[res_index])
                res_index += 1
            elif isinstance(mine, AttentionBlock):
                their.group_norm.num_groups = mine.norm.num_groups
                their.group_norm.load_state_dict(mine.norm.state_dict())
                for part, w, b in zip(
                    (their.to_q, their.to_k, their.to_v),
                    mine.qkv.weight.chunk(3),
                    mine.qkv.bias.chunk(3),
                    strict=True,
                ):
                    part.weight.copy_(w)
                    part.bias.copy_(b)
                their.to_out[0].load_state_dict(mine.proj.state_dict())
            elif isinstance(mine, Downsample | Upsample):
                their.conv.load_state_dict(mine.conv.state_dict())
            else:
                their.load_state_dict(mine.state_dict())
                if isinstance(mine, nn.GroupNorm):
                    their.num_groups = mine.num_groups


def check_port(ours: UNet, peer: nn.Module, lay: Layout, device: torch.device) -> float:
    """Max abs difference of the two networks' fp32 outputs on random input; exits above
    PORT_ATOL (the peer would not be doing our work)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, lay.in_channels, lay.size, lay.size, generator=g).to(device)
    t = torch.tensor([0, 250, 600, 999], device=device)
    labels = torch.tensor([0, 1, 2, lay.num_classes or 0], device=device)
    with torch.no_grad():
        diff = (ours(x, t, Cond(labels=labels)) - peer(x, t, class_labels=labels).sample).abs()
    if float(diff.max()) > PORT_ATOL:
        raise SystemExit(f"ported peer differs from ours by {float(diff.max()):.2e} > {PORT_ATOL}")
    return float(diff.max())
