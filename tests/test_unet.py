"""The U-Net backbone: shapes, conditioning, initialisation, gradients, precision, arguments."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from diffusion_core.config import ModelConfig
from diffusion_core.model import ModelCard
from diffusion_core.parameterization import Cond
from diffusion_core.unet import UNet, num_groups

SMALL: dict[str, Any] = {
    "base_channels": 16,
    "channel_mults": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (4,),
    "num_heads": 2,
    "dropout": 0.0,
}


def make(
    *,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int | None = None,
    context_dim: int | None = None,
    **overrides: Any,
) -> UNet:
    torch.manual_seed(0)
    return UNet(
        in_channels=in_channels,
        out_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        context_dim=context_dim,
        **{**SMALL, **overrides},
    )


def perturb_zero_init(net: UNet) -> UNet:
    """Give the zero-initialised output conv random weights so the output depends on the input."""
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.normal_(0.0, 0.05)
    return net


def inputs(
    batch: int = 3, channels: int = 1, size: int = 8, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32])
def test_output_shape_matches_input(channels: int, size: int) -> None:
    net = make(in_channels=channels, image_size=size, attention_resolutions=(size // 2,))
    x, t = inputs(2, channels, size)
    assert net(x, t).shape == x.shape


def test_zero_initialised_output_then_perturbed() -> None:
    net = make().eval()
    x, t = inputs()
    assert torch.count_nonzero(net(x, t)) == 0
    perturb_zero_init(net)
    assert net(x, t).abs().mean() > 1e-3


def test_output_depends_on_t() -> None:
    net = perturb_zero_init(make()).eval()
    x, _ = inputs()
    a = net(x, torch.full((3,), 10))
    b = net(x, torch.full((3,), 900))
    assert not torch.allclose(a, b, atol=1e-5)


def test_float_timesteps_accepted() -> None:
    net = perturb_zero_init(make()).eval()
    x, _ = inputs()
    a = net(x, torch.full((3,), 10))
    b = net(x, torch.full((3,), 10.0))
    torch.testing.assert_close(a, b)


def test_class_label_and_null_class() -> None:
    net = perturb_zero_init(make(num_classes=10)).eval()
    assert net.null_class == 10
    x, t = inputs()
    out = {k: net(x, t, Cond(labels=torch.full((3,), k))) for k in (0, 1, net.null_class)}
    assert not torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.allclose(out[0], out[net.null_class], atol=1e-5)
    # No labels at all means the null class.
    torch.testing.assert_close(net(x, t), out[net.null_class])
    torch.testing.assert_close(net(x, t, Cond()), out[net.null_class])


def test_null_class_unavailable_when_unconditional() -> None:
    with pytest.raises(AttributeError):
        _ = make().null_class


def test_output_depends_on_context_and_pooled() -> None:
    net = perturb_zero_init(make(context_dim=12)).eval()
    x, t = inputs()
    gen = torch.Generator().manual_seed(2)
    ctx = torch.randn(3, 5, 12, generator=gen)
    pooled = torch.randn(3, 12, generator=gen)
    base = net(x, t, Cond(context=ctx, pooled=pooled))
    assert not torch.allclose(base, net(x, t, Cond(context=ctx + 1.0, pooled=pooled)), atol=1e-5)
    assert not torch.allclose(base, net(x, t, Cond(context=ctx, pooled=pooled + 1.0)), atol=1e-5)
    # Cross-attention alone (pooled held fixed) moves the output too.
    ctx2 = torch.randn(3, 5, 12, generator=gen)
    assert not torch.allclose(base, net(x, t, Cond(context=ctx2, pooled=pooled)), atol=1e-5)
    # Without pooled, the mean of the context tokens stands in for it.
    torch.testing.assert_close(
        net(x, t, Cond(context=ctx)), net(x, t, Cond(context=ctx, pooled=ctx.mean(1)))
    )


def test_context_required_when_configured() -> None:
    net = make(context_dim=12)
    x, t = inputs()
    with pytest.raises(ValueError, match="context"):
        net(x, t, Cond())


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_classes": 4}, {"context_dim": 8}, {"num_classes": 4, "dropout": 0.1}],
)
def test_every_parameter_gets_a_gradient(kwargs: dict[str, Any]) -> None:
    net = perturb_zero_init(make(**kwargs)).train()
    x, t = inputs()
    cond = Cond(
        labels=torch.tensor([0, 1, 4]) if "num_classes" in kwargs else None,
        context=torch.randn(3, 5, 8) if "context_dim" in kwargs else None,
    )
    net(x, t, cond).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    zero = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # Only embedding rows of classes absent from the batch may be zero; whole tensors may not.
    assert not zero, f"parameters with an all-zero gradient: {zero}"


def test_batch_elements_are_independent() -> None:
    net = perturb_zero_init(make(num_classes=4, context_dim=8)).eval()
    x, t = inputs(4)
    labels = torch.tensor([0, 1, 2, 3])
    ctx = torch.randn(4, 5, 8)
    out = net(x, t, Cond(labels=labels, context=ctx))
    x2, t2 = x.clone(), t.clone()
    x2[1:] = torch.randn_like(x2[1:])
    t2[1:] = torch.tensor([5, 500, 999])
    labels2, ctx2 = labels.clone(), ctx.clone()
    labels2[1:] = 4
    ctx2[1:] = torch.randn_like(ctx2[1:])
    out2 = net(x2, t2, Cond(labels=labels2, context=ctx2))
    torch.testing.assert_close(out2[0], out[0], rtol=1e-4, atol=1e-5)
    # A batch of one gives the same result as well.
    single = net(x[:1], t[:1], Cond(labels=labels[:1], context=ctx[:1]))
    torch.testing.assert_close(single[0], out[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("channels", "groups"),
    [
        (1, 1),
        (2, 1),
        (3, 1),
        (8, 4),
        (16, 8),
        (32, 16),
        (48, 24),
        (64, 32),
        (96, 32),
        (128, 32),
        (256, 32),
    ],
)
def test_group_norm_grouping_rule(channels: int, groups: int) -> None:
    assert num_groups(channels) == groups
    assert channels % num_groups(channels) == 0


def test_group_norms_in_a_narrow_net_are_valid() -> None:
    net = make(base_channels=4, channel_mults=(1, 2), num_heads=1)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms
    for m in norms:
        assert m.num_channels % m.num_groups == 0
        assert m.num_groups <= 32
    x, t = inputs()
    assert net(x, t).shape == x.shape


def test_bf16_autocast_close_to_fp32() -> None:
    net = perturb_zero_init(make(num_classes=4, context_dim=8)).eval()
    with torch.no_grad():
        net.conv_out.weight.normal_(0.0, 0.2)
    x, t = inputs()
    cond = Cond(labels=torch.tensor([0, 1, 4]), context=torch.randn(3, 5, 8))
    with torch.no_grad():
        ref = net(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, cond)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3f}"


def test_bf16_autocast_backward() -> None:
    net = perturb_zero_init(make())
    x, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x, t).float().square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_bf16_weights_forward() -> None:
    net = perturb_zero_init(make(num_classes=4)).to(torch.bfloat16).eval()
    x, t = inputs()
    with torch.no_grad():
        out = net(x.bfloat16(), t, Cond(labels=torch.tensor([0, 1, 4])))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"channel_mults": ()}, "channel_mults"),
        ({"attention_resolutions": (3,)}, "attention_resolutions"),
        ({"attention_resolutions": (16,)}, "attention_resolutions"),
        ({"num_heads": 3}, "num_heads"),
        ({"base_channels": 0}, "base_channels"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"dropout": 1.0}, "dropout"),
        ({"image_size": 6, "channel_mults": (1, 2, 2)}, "image_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"context_dim": 0}, "context_dim"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(overrides: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make(**overrides)


def card(model: ModelConfig, *, in_channels: int, num_classes: int | None) -> ModelCard:
    return ModelCard(
        model=model,
        diffusion={},
        in_channels=in_channels,
        image_size=8,
        num_classes=num_classes,
        dataset_sha256="0" * 64,
    )


def test_model_card_builds_the_configured_unet() -> None:
    cfg = ModelConfig(
        base_channels=16, channel_mults=(1, 2), attention_resolutions=(4,), num_heads=2
    )
    net = card(cfg, in_channels=3, num_classes=5).build()
    assert net.null_class == 5
    x, t = inputs(2, 3, 8)
    assert net(x, t).shape == x.shape
    unconditional = cfg.model_copy(update={"class_conditional": False})
    assert card(unconditional, in_channels=1, num_classes=5).build().class_embed is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_fp32() -> None:
    net = perturb_zero_init(make(num_classes=4, context_dim=8)).eval()
    x, t = inputs()
    labels, context = torch.tensor([0, 1, 4]), torch.randn(3, 5, 8)
    cond = Cond(labels=labels, context=context)
    with torch.no_grad():
        ref = net(x, t, cond)
        gpu = net.cuda()
        cond_gpu = Cond(labels=labels.cuda(), context=context.cuda())
        out32 = gpu(x.cuda(), t.cuda(), cond_gpu).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out16 = gpu(x.cuda(), t.cuda(), cond_gpu).float().cpu()
    # cuDNN may run fp32 convolutions in TF32, hence the loose fp32 bound.
    assert (out32 - ref).norm() / ref.norm() < 5e-3
    assert (out16 - ref).norm() / ref.norm() < 0.05
