"""U-Net noise predictor of DDPM (Ho et al. 2020) with the changes of Nichol & Dhariwal 2021.

One implementation for images (``dims=2``: Conv2d over (B, C, H, W)) and volumes (``dims=3``:
Conv3d over (B, C, D, H, W)); attention runs over the flattened H*W or D*H*W positions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_core.parameterization import Cond

log = logging.getLogger(__name__)

MAX_GROUPS = 32
CONVS: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(
    dims: int, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int = 0
) -> nn.Conv2d | nn.Conv3d:
    """Conv2d (dims=2) or Conv3d (dims=3) with a square / cubic kernel."""
    return CONVS[dims](in_ch, out_ch, kernel, stride=stride, padding=padding)


def num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` <= 32 leaving >= 2 channels a group.

    64 channels give 32 groups, 32 give 16, 8 give 4; a single channel gives 1 group.
    """
    candidates = [g for g in range(1, MAX_GROUPS + 1) if channels % g == 0 and channels // g >= 2]
    return max(candidates, default=1)


def timestep_embedding(t: Tensor, freqs: Tensor) -> Tensor:
    """Sinusoidal embedding of Vaswani et al. 2017 as used by Ho et al. 2020: (B,) -> (B, 2F)."""
    args = t.float()[:, None] * freqs[None, :]  # (B, F)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GroupNorm(nn.GroupNorm):
    """GroupNorm that keeps the input dtype: statistics in fp32 inside the kernel, no round trip.

    With ``affine=False`` the affine step is left to the caller (folded into a FiLM step).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM by the time embedding (scale-shift), GN-SiLU-dropout-conv, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, *, dropout: float, dims: int = 2) -> None:
        super().__init__()
        self.out_ch = out_ch
        self.norm1 = GroupNorm(num_groups(in_ch), in_ch)
        self.conv1 = conv_nd(dims, in_ch, out_ch, 3, padding=1)
        # The second norm's affine is redundant with the FiLM scale-shift that follows it.
        self.norm2 = GroupNorm(num_groups(out_ch), out_ch, affine=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv_nd(dims, out_ch, out_ch, 3, padding=1)
        self.skip = conv_nd(dims, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, film: Tensor) -> Tensor:
        # film: (B, 2 * out_ch), the slice of the shared time-embedding projection for this block
        h = self.conv1(F.silu(self.norm1(x)))
        spatial = [1] * (h.ndim - 2)
        scale, shift = film.view(*film.shape, *spatial).chunk(2, dim=1)  # each (B, out_ch, 1, ...)
        h = torch.addcmul(shift, self.norm2(h), scale + 1)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W (or D*H*W) positions, optionally followed by
    cross-attention."""

    def __init__(self, channels: int, *, num_heads: int, context_dim: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(num_groups(channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.cross: CrossAttention | None = None
        if context_dim is not None:
            self.cross = CrossAttention(channels, context_dim=context_dim, num_heads=num_heads)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        b, c, *spatial = x.shape  # (B, C, H, W) or (B, C, D, H, W)
        n, heads = math.prod(spatial), self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(tokens).view(b, n, 3, heads, c // heads)  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)
        if self.cross is not None:
            assert context is not None
            out = out + self.cross(x.flatten(2).transpose(1, 2) + out, context)
        return x + out.transpose(1, 2).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Pre-norm cross-attention from image tokens to text tokens (Rombach et al. 2022)."""

    def __init__(self, channels: int, *, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, tokens: Tensor, context: Tensor) -> Tensor:
        b, n, c = tokens.shape
        heads, d, m = self.num_heads, c // self.num_heads, context.shape[1]
        q = self.q(self.norm(tokens)).view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
        kv = self.kv(context).view(b, m, 2, heads, d)  # (B, L, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class Stage(nn.Module):
    """One resolution step of the U-Net: a residual block, then attention where configured."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: Tensor, film: Iterator[Tensor], context: Tensor | None) -> Tensor:
        x = self.res(x, next(film))
        return x if self.attn is None else self.attn(x, context)


class Downsample(nn.Module):
    def __init__(self, channels: int, *, dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(dims, channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, *, dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Noise-prediction U-Net: ResBlocks with FiLM time/class conditioning, attention, skips.

    Every residual block's FiLM scale and shift come from one shared linear layer on the
    embedding (one matmul instead of one per block). With ``num_classes`` set, label index
    ``num_classes`` is the null class used for classifier-free guidance (and when no labels are
    given). With ``context_dim`` set, ``cond.context`` is required; ``cond.pooled`` defaults to the
    mean of the context tokens, so every parameter takes part in every step (DDP-safe).
    """

    freqs: Tensor  # (C0 / 2,) sinusoidal frequencies, a non-persistent buffer

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int,
        channel_mults: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_heads: int,
        dropout: float = 0.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        dims: int = 2,
    ) -> None:
        # Long function: builds the levels in the order of the diagram (down, middle, up).
        super().__init__()
        _check_args(
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mults=channel_mults,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads,
            dropout=dropout,
            num_classes=num_classes,
            context_dim=context_dim,
            dims=dims,
        )
        self.num_classes, self.context_dim, self.dims = num_classes, context_dim, dims
        emb_dim = 4 * base_channels
        half = base_channels // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.time_mlp = nn.Sequential(
            nn.Linear(2 * half, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.pooled_proj = nn.Linear(context_dim, emb_dim) if context_dim else None

        def stage(cin: int, cout: int, res: int) -> Stage:
            attn = None
            if res in attention_resolutions:
                attn = AttentionBlock(cout, num_heads=num_heads, context_dim=context_dim)
            return Stage(ResBlock(cin, cout, dropout=dropout, dims=dims), attn)

        self.conv_in = conv_nd(dims, in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, base_channels * mult, res))
                ch = base_channels * mult
                skips.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(ch, dims=dims))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [
                Stage(
                    ResBlock(ch, ch, dropout=dropout, dims=dims),
                    AttentionBlock(ch, num_heads=num_heads, context_dim=context_dim),
                ),
                Stage(ResBlock(ch, ch, dropout=dropout, dims=dims), None),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(ch + skips.pop(), base_channels * mult, res))
                ch = base_channels * mult
            if level != 0:
                self.up.append(Upsample(ch, dims=dims))
                res *= 2
        self.norm_out = GroupNorm(num_groups(ch), ch)
        self.conv_out = conv_nd(dims, ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        if self.conv_out.bias is not None:
            nn.init.zeros_(self.conv_out.bias)

        # One projection of the embedding gives every residual block its (scale, shift).
        self.film_sizes = [2 * m.out_ch for m in self.modules() if isinstance(m, ResBlock)]
        self.film = nn.Linear(emb_dim, sum(self.film_sizes))

    @property
    def null_class(self) -> int:
        if self.num_classes is None:
            raise AttributeError("this UNet is not class-conditional (num_classes=None)")
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if x.ndim != self.dims + 2:
            raise ValueError(
                f"this UNet has dims={self.dims}: expected a {self.dims + 2}-D input "
                f"(B, C{', D' if self.dims == 3 else ''}, H, W), got shape {tuple(x.shape)}"
            )
        t_emb = timestep_embedding(t, self.freqs).to(self.conv_in.weight.dtype)  # (B, C0)
        emb = self.time_mlp(t_emb)  # (B, E)
        if self.class_embed is not None:
            labels = cond.labels if cond is not None else None
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_class, device=x.device)
            emb = emb + self.class_embed(labels)
        context = None
        if self.pooled_proj is not None:
            if cond is None or cond.context is None:
                raise ValueError("this UNet has context_dim set: cond.context is required")
            context = cond.context
            pooled = cond.pooled if cond.pooled is not None else context.mean(dim=1)
            emb = emb + self.pooled_proj(pooled)
        film = iter(self.film(F.silu(emb)).split(self.film_sizes, dim=1))  # (B, 2 C_i) each

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, film, context) if isinstance(block, Stage) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, film, context)
        for block in self.up:
            if isinstance(block, Stage):
                h = block(torch.cat([h, skips.pop()], dim=1), film, context)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_args(
    *,
    in_channels: int,
    out_channels: int,
    image_size: int,
    base_channels: int,
    channel_mults: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    num_heads: int,
    dropout: float,
    num_classes: int | None,
    context_dim: int | None,
    dims: int,
) -> None:
    if dims not in CONVS:
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims}")
    for name, value in [
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("image_size", image_size),
        ("base_channels", base_channels),
        ("num_res_blocks", num_res_blocks),
        ("num_heads", num_heads),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if base_channels % 2:
        raise ValueError(f"base_channels must be even (sinusoidal embedding), got {base_channels}")
    if not channel_mults or any(m < 1 for m in channel_mults):
        raise ValueError(
            f"channel_mults must be a non-empty list of ints >= 1, got {channel_mults}"
        )
    levels = len(channel_mults)
    if image_size % 2 ** (levels - 1):
        raise ValueError(
            f"image_size {image_size} must be divisible by 2**{levels - 1} "
            f"for channel_mults of length {levels}"
        )
    reachable = [image_size // 2**i for i in range(levels)]
    for r in attention_resolutions:
        if r not in reachable:
            raise ValueError(
                f"attention_resolutions: {r} is not a feature-map size of this U-Net "
                f"(reachable: {reachable})"
            )
    attn_channels = {base_channels * channel_mults[-1]}
    attn_channels |= {
        base_channels * m
        for m, r in zip(channel_mults, reachable, strict=True)
        if r in attention_resolutions
    }
    for c in sorted(attn_channels):
        if c % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the attention width {c}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
    if context_dim is not None and context_dim < 1:
        raise ValueError(f"context_dim must be >= 1 or None, got {context_dim}")


def channels_last_format(net: nn.Module) -> torch.memory_format:
    """The channels-last memory format for ``net``'s convolutions: NHWC for a 2-D network, NDHWC
    for a 3-D one (``dims``, 2 when the network has none)."""
    return torch.channels_last_3d if getattr(net, "dims", 2) == 3 else torch.channels_last


def compile_unet(net: nn.Module, *, dynamic: bool = False) -> nn.Module:
    """``torch.compile`` (inductor) of a network; same results within bf16 tolerance."""
    return cast(nn.Module, torch.compile(net, dynamic=dynamic))


class CompiledForInference(nn.Module):
    """A network compiled for inference: ``torch.compile`` with inductor's freezing (the weights
    become constants of the graph, prepacked for oneDNN's convolutions on a CPU) for the first
    batch shape it sees; calls of any other shape (a run's last, smaller batch; unguided steps
    outside a guidance interval) run ``net`` eagerly, so the graph is compiled once and never
    retraced with a symbolic batch (slower kernels). Inference only: ``net`` must not change
    after the first call (its weights are frozen into the graph); same results as eager within
    float rounding (bench/README.md, ``sample_throughput.py --compile --freeze``).

    When the compile fails (no C++ compiler on the worker, an unsupported operator) the failure
    is logged and the network runs eagerly: a slower sample step, not a failed run. torch
    compiles a forward for at most ``torch._dynamo.config.recompile_limit`` networks a process
    (8) and runs later ones eagerly, with its own warning."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.compiled: nn.Module | None = cast(
            nn.Module, torch.compile(net, dynamic=False, options={"freezing": True})
        )
        self.shape: torch.Size | None = None

    def forward(self, x: Tensor, *args: object) -> Tensor:
        if self.shape is None and self.compiled is not None:
            self.shape = x.shape
            try:
                return cast(Tensor, self.compiled(x, *args))
            except Exception as exc:  # the compile failed, not the network: it runs eagerly
                log.warning(
                    "torch.compile failed, sampling eagerly: %s: %s", type(exc).__name__, exc
                )
                self.compiled = None
        if self.compiled is not None and x.shape == self.shape:
            return cast(Tensor, self.compiled(x, *args))
        return cast(Tensor, self.net(x, *args))
