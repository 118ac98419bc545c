"""The model card: what a checkpoint carries, how old checkpoints load, errors for bad ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_core.config import parse_config
from diffusion_core.model import CheckpointError, ModelCard, load_model, read_state
from diffusion_core.sampling import SampleRequest, generate

LEGACY = Path(__file__).parent / "data" / "legacy-checkpoint"


def test_a_checkpoint_written_before_the_card_loads_and_samples_as_it_did() -> None:
    """tests/data/legacy-checkpoint was written by the trainer before checkpoints carried a model
    card (its config.json holds the whole run config); expected-samples.safetensors holds the
    four samples that code drew from it (DDIM 5 steps, guidance 2, labels 0-3, seed 0)."""
    net, card = load_model(LEGACY)
    legacy = json.loads((LEGACY / "config.json").read_text())["config"]
    assert card.model.model_dump() == parse_config({"model": legacy["model"]}).model.model_dump()
    assert card.diffusion.num_steps == 100 and card.num_classes == 10 and card.image_size == 8
    assert card.sampling.sampler == "ddim" and card.sampling.steps == 5
    assert card.sampling.guidance_scale == 2.0
    expected = load_file(LEGACY / "expected-samples.safetensors")
    request = SampleRequest(labels=tuple(expected["labels"].tolist()))
    images = generate(net, card, request).images
    # One uint8 level of rounding may differ between CPUs.
    assert (images.int() - expected["images"].int()).abs().max() <= 1


def test_the_card_holds_no_pipeline_settings(tmp_path: Path) -> None:
    _, card = load_model(LEGACY)
    text = card.to_json()
    for section in ('"safety"', '"evaluation"', '"pipeline"', '"train"', '"data"'):
        assert section not in text
    assert ModelCard.from_dict(json.loads(text)) == card


def test_bad_checkpoints_are_named_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(LEGACY, broken)
    (broken / "ema.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors"):
        load_model(broken)
    (broken / "config.json").write_text('{"config": {"model": {"base_channels": "wide"}}}')
    with pytest.raises(CheckpointError, match=r"config\.json: not a model card"):
        load_model(broken)
    crafted = tmp_path / "state.pt"
    torch.save({"step": 3, "callable": print}, crafted)  # a pickle that names code
    with pytest.raises(CheckpointError, match=r"state\.pt: not a loadable training state"):
        read_state(crafted)
    crafted.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"state\.pt"):
        read_state(crafted)
