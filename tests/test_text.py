"""Text conditioning: prompt path, prompt dropout, guidance oracle, encoder round trip, CLI, pyfunc
and the analytic shapes detector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.config import DataConfig, SamplingDefaults, TextConfig, parse_config
from diffusion_core.data import load_dataset
from diffusion_core.data.sources import load_folder
from diffusion_core.evaluation.shapes import adherence, detect, parse_caption
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.model import load_model
from diffusion_core.parameterization import PREDICTIONS, Denoiser
from diffusion_core.sampling import SampleRequest, card_text_encoder, generate, text_denoiser
from diffusion_core.schedules import NoiseSchedule
from diffusion_core.text import (
    NULL_PROMPT,
    ClipError,
    ClipModel,
    PromptTable,
    TextEncoderMismatch,
    cycle_prompts,
    load_clip,
    load_text_encoder,
    resolve_context_dim,
    state_fingerprint,
    text_cond,
)
from diffusion_core.training import train
from diffusion_core.unet import UNet

TINY_CLIP = str(Path(__file__).resolve().parents[1] / "configs" / "clip" / "tiny-clip.json")
PROMPTS = ["a red square at the top left", "a blue circle in the center"]


def text_config(tmp_path: Path, **text: object) -> dict:
    """A tiny text-conditioned run on 8x8 captioned shapes."""
    return {
        "name": "tiny-text",
        "data": {"kind": "shapes", "image_size": 8, "num_samples": 48},
        "model": {
            "base_channels": 8,
            "channel_mults": [1, 2],
            "attention_resolutions": [4],
            "num_heads": 2,
            "class_conditional": False,
        },
        "text": {"model": TINY_CLIP, **text},
        "diffusion": {"num_steps": 50},
        "train": {"steps": 2, "batch_size": 8, "warmup_steps": 1, "log_every": 1},
        "sample": {"steps": 2, "guidance_scale": 2.0, "prompts": PROMPTS},
    }


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP weights file written here (random weights from seed 5)."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(load_clip(TINY_CLIP).model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory, clip_weights: Path) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    cfg = parse_config(text_config(tmp, pretrained=str(clip_weights)))
    result = train(cfg, load_dataset(cfg.data), tmp, progress=False)
    return result.checkpoint


def random_text_unet(context_dim: int) -> UNet:
    """A text U-Net with a non-zero output layer, so the prompt shows in its output."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=3,
        out_channels=3,
        image_size=8,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        context_dim=context_dim,
    )
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return net.eval()


# ----------------------------------------------------------------------------- conditioning path


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_text_encoder(TextConfig(model=TINY_CLIP))


def test_prompt_states_feed_the_unet_and_change_its_output(clip: ClipModel) -> None:
    cond = text_cond(clip, PROMPTS, use_pooled=True)
    assert cond.context is not None and cond.pooled is not None
    assert cond.context.shape == (2, 32, clip.context_dim) and cond.pooled.shape == (2, 64)
    net = random_text_unet(clip.context_dim)
    x, t = torch.randn(1, 3, 8, 8).repeat(2, 1, 1, 1), torch.tensor([10, 10])
    with torch.no_grad():
        out = net(x, t, cond)
        again = net(x, t, text_cond(clip, PROMPTS, use_pooled=True))
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out, again)  # the same prompt, the same output
    assert (out[0] - out[1]).abs().max() > 1e-3  # another prompt, another output
    assert resolve_context_dim(None, clip, TextConfig(model=TINY_CLIP)) == 64
    with pytest.raises(ClipError, match="leave model\\.context_dim unset"):
        resolve_context_dim(32, clip, TextConfig(model=TINY_CLIP))
    unpooled = text_cond(clip, PROMPTS, use_pooled=False)
    assert unpooled.pooled is not None and not unpooled.pooled.any()
    # random weights come from text.seed: the same seed, the same encoder
    assert state_fingerprint(load_text_encoder(TextConfig(model=TINY_CLIP))) == state_fingerprint(
        clip
    )
    assert state_fingerprint(load_text_encoder(TextConfig(model=TINY_CLIP, seed=1))) != (
        state_fingerprint(clip)
    )


def test_prompt_dropout_gives_the_empty_prompt_at_the_configured_rate(clip: ClipModel) -> None:
    captions = [PROMPTS[i % 2] for i in range(10)]
    table = PromptTable.build(clip, captions, use_pooled=True)
    empty = clip.encode_text([NULL_PROMPT])
    assert torch.equal(table.tokens[table.null], empty.tokens[0])
    assert torch.equal(table.pooled[table.null], empty.pooled[0])
    assert len(table.tokens) == 3  # two distinct captions and "", each encoded once
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(10).repeat(2000)  # 20,000 draws
    for rate in (0.0, 0.1, 0.5, 1.0):
        rows = table.rows(idx, dropout=rate, generator=gen)
        dropped = rows == table.null
        n = len(rows)
        assert abs(float(dropped.float().mean()) - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)
        assert torch.equal(rows[~dropped], table.index[idx][~dropped])
        cond = table.cond(rows)
        assert cond.context is not None
        if rate < 1.0:
            kept = cond.context[~dropped][:3]
            expected = clip.encode_text([captions[i] for i in idx[~dropped][:3].tolist()])
            assert torch.equal(kept, expected.tokens)
        assert torch.equal(cond.context[dropped], empty.tokens.expand(int(dropped.sum()), -1, -1))


# ----------------------------------------------------------------------------- guidance oracle


def test_guidance_scale_one_is_conditional_and_zero_is_the_empty_prompt(text_checkpoint) -> None:
    net, card = load_model(text_checkpoint)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    clip = card_text_encoder(card)
    schedule = NoiseSchedule.from_name(card.diffusion.schedule, 50)
    base = Denoiser(net, schedule, PREDICTIONS["eps"])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([30, 30])
    with torch.no_grad():
        x0_c = base.with_cond(text_cond(clip, PROMPTS, use_pooled=True))(x, t)
        x0_u = base.with_cond(text_cond(clip, ["", ""], use_pooled=True))(x, t)
        for scale, expected in ((1.0, x0_c), (0.0, x0_u), (2.5, x0_u + 2.5 * (x0_c - x0_u))):
            knobs = SamplingDefaults(guidance_scale=scale, clip_x0=False)
            guided = text_denoiser(net, card, knobs, clip, PROMPTS)
            if scale != 1.0:
                assert isinstance(guided, ClassifierFreeGuidance)
            torch.testing.assert_close(guided(x, t), expected, rtol=1e-5, atol=1e-5)
    assert (x0_c - x0_u).abs().max() > 1e-3  # the oracle tells the branches apart


# ----------------------------------------------------------------------------- checkpoint


def test_checkpoint_reloads_the_same_encoder_and_refuses_another(
    text_checkpoint: Path, clip_weights: Path, tmp_path: Path
) -> None:
    import hashlib
    import shutil

    card_json = json.loads((text_checkpoint / "card.json").read_text())
    record = card_json["text_encoder"]
    assert record["weights_sha256"] == hashlib.sha256(clip_weights.read_bytes()).hexdigest()
    assert record["model"] == "tiny-clip" and record["context_dim"] == 64
    assert card_json["model"]["context_dim"] == 64  # from the encoder's width
    _, card = load_model(text_checkpoint)
    assert state_fingerprint(card_text_encoder(card)) == record["state_sha256"]

    # The same weights at another path load; other weights are refused, naming both hashes.
    torch.manual_seed(6)
    other = tmp_path / "other.pt"
    torch.save(load_clip(TINY_CLIP).model.state_dict(), other)
    moved = tmp_path / "moved.pt"
    shutil.copy(clip_weights, moved)
    for path, ok in ((moved, True), (other, False)):
        ckpt = tmp_path / f"ckpt-{path.stem}"
        shutil.copytree(text_checkpoint, ckpt)
        edited = json.loads((ckpt / "card.json").read_text())
        edited["text"]["pretrained"] = str(path)
        (ckpt / "card.json").write_text(json.dumps(edited))
        net, card = load_model(ckpt)
        request = SampleRequest(prompts=tuple(PROMPTS), num_samples=2)
        if ok:
            assert generate(net, card, request).prompts == PROMPTS
        else:
            with pytest.raises(TextEncoderMismatch, match=record["state_sha256"]):
                generate(net, card, request)


def test_prompts_and_labels_go_only_to_models_that_take_them(text_checkpoint) -> None:
    net, card = load_model(text_checkpoint)
    with pytest.raises(ValueError, match="pass prompts, not class labels"):
        generate(net, card, SampleRequest(prompts=tuple(PROMPTS), labels=(0, 1)))
    with pytest.raises(ValueError, match="give prompts"):
        generate(net, card, SampleRequest(num_samples=2))
    samples = generate(net, card, SampleRequest(num_samples=5, prompts=("a", "b")), offset=1)
    assert samples.prompts == ["b", "a", "b", "a", "b"] == cycle_prompts(["a", "b"], 5, offset=1)


def test_image_folder_with_captions_trains_a_text_model(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    rows = ["file,caption"]
    for i in range(8):
        pixels = np.full((8, 8, 3), 30 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append(f"{i}.png,a picture number {i % 4}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    raw = text_config(tmp_path)
    raw["data"] = {"kind": "folder", "root": str(root), "image_size": 8}
    cfg = parse_config(raw)
    dataset = load_folder(cfg.data)
    assert dataset.captions == [f"a picture number {i % 4}" for i in range(8)]
    result = train(cfg, dataset, tmp_path / "run", progress=False)
    net, card = load_model(result.checkpoint)
    samples = generate(net, card, SampleRequest(num_samples=2, prompts=("a picture",)))
    assert samples.images.shape == (2, 3, 8, 8)


def test_a_class_conditional_config_cannot_have_text() -> None:
    raw = text_config(Path("."))
    raw["model"]["class_conditional"] = True
    with pytest.raises(ValueError, match="class_conditional: false"):
        parse_config(raw)


def test_pipeline_sample_step_cycles_prompts_across_shards(text_checkpoint, tmp_path) -> None:
    from diffusion_core.pipeline.stages.sample import sample_shard
    from diffusion_core.pipeline.store import ArtefactStore

    store = ArtefactStore(f"file://{tmp_path / 'store'}")
    store.put_dir("run/checkpoint", text_checkpoint)
    request = SampleRequest(prompts=("p0", "p1", "p2"), num_samples=4)
    prompts = []
    for shard in (0, 1):
        ref = sample_shard(
            store, "run/checkpoint", request, out_prefix="run/samples", shard=shard, shard_size=2
        )
        lines = store.get_bytes(f"{ref.prefix}/metadata.jsonl").decode().splitlines()
        prompts += [json.loads(line)["prompt"] for line in lines]
    assert prompts == ["p0", "p1", "p2", "p0"]  # sample i gets prompt i % 3, whatever the shard


# ----------------------------------------------------------------------------- CLI and pyfunc


def test_cli_samples_prompts_and_refuses_labels(text_checkpoint, tmp_path: Path) -> None:
    from diffpipe.flows.cli import EXIT_BAD_INPUT, main

    out = tmp_path / "samples"
    args = ["sample", "--checkpoint", str(text_checkpoint), "--steps", "2", "--num", "3"]
    assert main([*args, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert (out / "prompts.txt").read_text().splitlines() == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    listing = tmp_path / "prompts.txt"
    listing.write_text(f"{PROMPTS[1]}\n\n")
    grid = tmp_path / "grid.png"
    assert main([*args, "--prompts-file", str(listing), "--out", str(grid)]) == 0
    assert grid.is_file() and grid.with_suffix(".txt").read_text().splitlines() == [PROMPTS[1]] * 3
    assert main([*args, "--labels", "0,1", "--out", str(tmp_path / "x")]) == EXIT_BAD_INPUT
    missing = str(tmp_path / "none.txt")
    assert main([*args, "--prompts-file", missing, "--out", str(grid)]) == EXIT_BAD_INPUT


def test_cli_refuses_prompts_for_a_class_conditional_model(tmp_path, tiny_config_dict) -> None:
    from diffpipe.flows.cli import EXIT_BAD_INPUT, main

    cfg = parse_config(tiny_config_dict | {"train": tiny_config_dict["train"] | {"steps": 1}})
    ckpt = train(cfg, load_dataset(cfg.data), tmp_path, progress=False).checkpoint
    args = ["sample", "--checkpoint", str(ckpt), "--steps", "1", "--num", "2"]
    assert main([*args, "--prompt", "a seven", "--out", str(tmp_path / "s")]) == EXIT_BAD_INPUT


def test_pyfunc_takes_prompts(text_checkpoint, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    code = Path(__file__).resolve().parents[1] / "tasks" / "mlflow_model.py"
    mlflow.pyfunc.save_model(
        path=str(tmp_path / "model"),
        python_model=str(code),
        artifacts={
            "weights": str(text_checkpoint / "ema.safetensors"),
            "card": str(text_checkpoint / "card.json"),
        },
    )
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    images = model.predict({"prompts": PROMPTS, "num_samples": 3, "steps": 2})
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    frame = pd.DataFrame({"prompt": [PROMPTS[0], PROMPTS[1], PROMPTS[0]], "steps": 2})
    again = model.predict(frame)
    np.testing.assert_array_equal(again, images)  # same prompts and seeds, same images
    with pytest.raises(ValueError, match="not class labels"):
        model.predict({"labels": [0, 1], "steps": 2})


# ----------------------------------------------------------------------------- shapes detector


@pytest.mark.parametrize("size", [16, 20, 24, 32])
def test_detector_is_exact_on_the_datasets_own_images(size: int) -> None:
    ds = load_dataset(DataConfig(kind="shapes", image_size=size, num_samples=400, split_seed=3))
    assert ds.captions is not None
    assert adherence(ds.images, ds.captions) == {
        "shape": 1.0,
        "colour": 1.0,
        "position": 1.0,
        "all": 1.0,
    }
    # pixel noise (std 20 of 255) does not move it: it reads shapes, not exact pixel values
    g = torch.Generator().manual_seed(size)
    noisy = ds.images.float() + 20 * torch.randn(ds.images.shape, generator=g)
    assert adherence(noisy.clamp(0, 255).round().to(torch.uint8), ds.captions)["all"] == 1.0
    # with the captions shuffled, the detector disagrees about as often as chance says
    shuffled = [ds.captions[(i + 1) % len(ds.captions)] for i in range(len(ds.captions))]
    wrong = adherence(ds.images, shuffled)
    assert wrong["shape"] < 0.5 and wrong["colour"] < 0.4 and wrong["position"] < 0.25


def test_detector_finds_nothing_on_a_blank_image_and_captions_parse() -> None:
    blank = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    assert detect(blank) == [None]
    assert adherence(blank, [PROMPTS[0]])["all"] == 0.0
    parsed = parse_caption("a green triangle on the right")
    assert (parsed.shape, parsed.colour, parsed.position) == ("triangle", "green", "right")
    assert parse_caption("a circle in the center").colour is None  # greyscale captions
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a purple hexagon at the top")
