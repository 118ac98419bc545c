"""Sampling lays the network out in channels-last memory where that is faster (our 2-D U-Net on a
CPU in fp32): the same samples, and the caller's network untouched."""

from __future__ import annotations

import torch

from diffusion_core.config import parse_config
from diffusion_core.sampling import SampleRequest, generate, prefers_channels_last
from diffusion_core.unet import UNet
from tests.conftest import TINY, card_for


def tiny_net_and_card():
    cfg = parse_config(TINY)
    card = card_for(cfg)
    torch.manual_seed(0)
    net = card.build().eval()
    net.conv_out.reset_parameters()  # zero-initialised for training: every sample would be flat
    return net, card


def test_channels_last_is_chosen_only_where_it_was_measured_faster() -> None:
    net, _ = tiny_net_and_card()
    assert prefers_channels_last(net, None)  # CPU, fp32
    assert not prefers_channels_last(net, torch.bfloat16)  # NHWC was slower in bf16
    volume = UNet(
        in_channels=1,
        out_channels=1,
        image_size=8,
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        num_heads=1,
        dims=3,
    )
    assert not prefers_channels_last(volume, None)  # 5-D tensors: not measured
    assert not prefers_channels_last(torch.nn.Conv2d(1, 1, 3), None)  # not our U-Net


def test_channels_last_sampling_gives_the_same_images_and_leaves_the_network_alone() -> None:
    net, card = tiny_net_and_card()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    request = SampleRequest(num_samples=6, steps=5, guidance_scale=2.0, clip_x0=False, seed=3)
    plain = generate(net, card, request, channels_last=False).images
    laid_out = generate(net, card, request).images  # channels-last, as chosen on this CPU
    # The same arithmetic in another memory order: at most one uint8 level of rounding apart.
    assert (plain.int() - laid_out.int()).abs().max() <= 1
    assert (plain != laid_out).float().mean() < 0.01
    for k, v in net.state_dict().items():
        assert v.is_contiguous(), k  # the caller's network keeps its layout ...
        assert torch.equal(v, weights[k]), k  # ... and its weights
