"""Sampling lays the network out in channels-last memory where that is faster (our 2-D and 3-D
U-Nets on a CPU in fp32): the same samples, and the caller's network untouched."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_core.config import parse_config
from diffusion_core.sampling import SampleRequest, generate, prefers_channels_last
from diffusion_core.unet import CompiledForInference, UNet
from tests.conftest import TINY, card_for


def tiny_net_and_card(dims: int = 2):
    volumes = {"data": {"kind": "volumes", "image_size": 8}, "model": TINY["model"] | {"dims": 3}}
    cfg = parse_config(TINY if dims == 2 else TINY | volumes)
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
    assert prefers_channels_last(volume, None)  # NDHWC: 1.5x faster on a CPU in fp32
    assert not prefers_channels_last(torch.nn.Conv2d(1, 1, 3), None)  # not our U-Net


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_sampling_gives_the_same_images_and_leaves_the_network_alone(
    dims: int,
) -> None:
    net, card = tiny_net_and_card(dims)
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


def test_the_sample_step_with_runtime_compile_gives_the_same_images(tmp_path, monkeypatch) -> None:
    import diffusion_core.sampling as sampling
    from diffusion_core.config import RuntimeConfig
    from diffusion_core.model import write_checkpoint
    from diffusion_core.pipeline.stages.sample import sample_shard
    from diffusion_core.pipeline.store import ArtefactStore

    net, card = tiny_net_and_card()
    sd = net.state_dict()
    ckpt = write_checkpoint(tmp_path / "ckpt", 1, card=card, weights=sd, ema=sd, state={})
    store = ArtefactStore(f"file://{tmp_path / 'store'}")
    store.put_dir("run/checkpoint", ckpt)
    # 10 samples in batches of 4: the compiled graph serves the two full batches (8 images with
    # guidance), the last batch of 2 runs eagerly.
    request = SampleRequest(
        num_samples=10, batch_size=4, steps=4, guidance_scale=2.0, clip_x0=False, seed=5
    )
    compiled_shapes: list[torch.Size | None] = []

    class Spy(CompiledForInference):
        def forward(self, x, *args):
            out = super().forward(x, *args)
            compiled_shapes.append(self.shape)
            return out

    monkeypatch.setattr(sampling, "CompiledForInference", Spy)
    images = {}
    for compile in (False, True):
        ref = sample_shard(
            store,
            "run/checkpoint",
            request,
            out_prefix=f"run/samples-{compile}",
            shard=0,
            shard_size=10,
            runtime=RuntimeConfig(compile=compile),
        )
        with tempfile.TemporaryDirectory() as tmp:
            store.get_dir(ref.prefix, tmp)
            images[compile] = load_file(Path(tmp) / "images.safetensors")["images"]
    plain, compiled = images[False], images[True]
    assert plain.shape == compiled.shape == (10, *card.sample_shape)
    assert (plain.int() - compiled.int()).abs().max() <= 1
    assert (plain != compiled).float().mean() < 0.01
    assert not torch.equal(plain[:4], plain[4:8])  # the samples differ: the check has teeth
    assert set(compiled_shapes) == {(8, *card.sample_shape)}  # compiled for a full guided batch


def test_a_compiled_network_compiles_its_first_shape_and_runs_the_others_eagerly() -> None:
    net, card = tiny_net_and_card()
    torch._dynamo.reset()  # graphs of other tests' networks would count as earlier compiles
    wrapped = CompiledForInference(net)
    x = torch.randn(6, *card.sample_shape)
    t = torch.full((6,), 3)
    # A second shape sent to the compiled graph would recompile it: make that an error.
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        first = wrapped(x[:4], t[:4], None)
        other = wrapped(x[:2], t[:2], None)
        again = wrapped(x[2:6], t[2:6], None)
        assert torch.allclose(first, net(x[:4], t[:4], None), atol=1e-4)
        assert torch.equal(other, net(x[:2], t[:2], None))  # eager: the same arithmetic
        assert torch.allclose(again, net(x[2:6], t[2:6], None), atol=1e-4)
    assert wrapped.shape == (4, *card.sample_shape)


def test_a_failed_compile_is_logged_and_the_network_runs_eagerly(caplog) -> None:
    net, card = tiny_net_and_card()
    wrapped = CompiledForInference(net)

    class NoCompiler(torch.nn.Module):  # what inductor raises on a worker without a compiler
        def forward(self, *args):
            raise RuntimeError("no C++ compiler found")

    wrapped.compiled = NoCompiler()
    x, t = torch.randn(4, *card.sample_shape), torch.full((4,), 3)
    with torch.no_grad(), caplog.at_level("WARNING", logger="diffusion_core.unet"):
        out = wrapped(x, t, None)
        again = wrapped(x, t, None)
        expected = net(x, t, None)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert wrapped.compiled is None
    assert "torch.compile failed, sampling eagerly: RuntimeError: no C++ compiler" in caplog.text
