"""The open_clip loader: weights only from configured places, verified, and cached prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion_core.config import TextConfig
from diffusion_core.text import (
    ClipError,
    check_encoder,
    encoder_record,
    load_clip,
    load_text_encoder,
    resolve_context_dim,
    state_fingerprint,
)

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "clip" / "tiny-clip.json")
FINGERPRINT_TINY_SEED_0 = "3b24aacb51ce14a00a34cad85074cb610ecce429e77543910788a08d0d209d3d"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint written by the test: a randomly initialised tiny model's state dict."""
    torch.manual_seed(123)
    model = load_clip(TINY).model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(state, path)
    return path, state


def test_weights_from_file_and_url_are_loaded_and_hashed(weights_file, tmp_path: Path) -> None:
    import hashlib

    path, state = weights_file
    expected_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for source in (str(path), f"file://{path}"):
        clip = load_clip(TINY, source, sha256=expected_sha, cache_dir=tmp_path)
        assert clip.weights_sha256 == expected_sha
        for k, v in clip.model.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    fresh = load_clip(TINY).model.state_dict()  # random init differs from the file
    assert not torch.equal(fresh["token_embedding.weight"], state["token_embedding.weight"])


def test_sha_mismatch_missing_file_and_hub_tag_are_refused(weights_file, tmp_path: Path) -> None:
    path, _ = weights_file
    with pytest.raises(ClipError, match="expected"):
        load_clip(TINY, str(path), sha256="0" * 64)
    with pytest.raises(ClipError, match="no such file"):
        load_clip(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(ClipError, match="would be downloaded"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(ClipError, match="not a file, URL or known tag"):
        load_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(ClipError, match="neither a built-in"):
        load_clip("No-Such-Model")


def test_text_states_match_open_clip_and_are_cached(weights_file) -> None:
    path, _ = weights_file
    clip = load_clip(TINY, str(path))
    prompts = ["a red square at the top left", "a blue circle", "a red square at the top left"]
    emb = clip.encode_text(prompts)
    assert emb.tokens.shape == (3, 32, clip.context_dim)
    assert emb.pooled.shape == (3, clip.embed_dim)
    torch.testing.assert_close(emb.tokens[0], emb.tokens[2], rtol=0, atol=0)
    assert not torch.allclose(emb.tokens[0], emb.tokens[1])
    # Pooled equals open_clip's own encode_text; token states end in ln_final.
    ref = clip.model.encode_text(clip.tokenizer(prompts))
    torch.testing.assert_close(emb.pooled, ref)
    # A later call answers from the cache, with the same numbers.
    assert set(clip._text_cache) == set(prompts)
    again = clip.encode_text(["a blue circle"])
    torch.testing.assert_close(again.tokens[0], emb.tokens[1], rtol=0, atol=0)


def test_image_features_normalised_and_grey_equals_repeated_rgb(weights_file) -> None:
    path, _ = weights_file
    clip = load_clip(TINY, str(path))
    grey = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    f_grey = clip.image_features(grey)
    f_rgb = clip.image_features(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(f_grey, f_rgb)
    torch.testing.assert_close(f_grey.norm(dim=1), torch.ones(4))
    with pytest.raises(ClipError, match="uint8"):
        clip.image_features(grey.float())


def _manual_token_states(model, text: torch.Tensor) -> torch.Tensor:
    """The plain ``CLIP`` text tower run by hand (what diffpipe did before open_clip had
    ``forward_intermediates``): embeddings, transformer with the causal mask, final norm."""
    x = model.token_embedding(text) + model.positional_embedding
    return model.ln_final(model.transformer(x, attn_mask=model.attn_mask))


def test_token_states_equal_the_text_tower_run_by_hand(weights_file) -> None:
    path, _ = weights_file
    clip = load_clip(TINY, str(path))
    prompts = ["a red square at the top left", "a blue circle", ""]
    with torch.no_grad():
        expected = _manual_token_states(clip.model, clip.tokenizer(prompts))
    torch.testing.assert_close(clip.encode_text(prompts).tokens, expected, rtol=0, atol=0)
    assert (clip.context_dim, clip.embed_dim) == (64, 64)


def test_tiny_encoder_fingerprint_is_unchanged() -> None:
    """A checkpoint records the sha256 of its (here random, seed 0) encoder's state and refuses
    another at sampling time: the tiny config's value must stay what it was when such
    checkpoints were written (open_clip 3.3.0, torch 2.14.1)."""
    clip = load_text_encoder(TextConfig(model=TINY))
    assert state_fingerprint(clip) == FINGERPRINT_TINY_SEED_0


# Custom text towers (``CustomTextCLIP``): the text transformer lives in ``model.text``. The second
# is shaped like SigLIP's text tower (its name must not contain "siglip", which would select
# SigLIP's own tokenizer): no causal mask, the last token pooled, a projection with a bias.
CUSTOM_TEXT = {
    "tiny-custom-text": {},
    "tiny-bidirectional": {"no_causal_mask": True, "pool_type": "last", "proj_bias": True},
}


@pytest.mark.parametrize("name", sorted(CUSTOM_TEXT))
def test_custom_text_tower_gives_token_states(name: str, tmp_path: Path) -> None:
    config = json.loads(Path(TINY).read_text())
    config["custom_text"] = True
    config["text_cfg"].update(CUSTOM_TEXT[name])
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(3)
    clip = load_clip(str(path))
    assert type(clip.model).__name__ == "CustomTextCLIP"
    prompts = ["a red square at the top left", "a blue circle"]
    emb = clip.encode_text(prompts)
    assert emb.tokens.shape == (2, 32, 64) and emb.pooled.shape == (2, 64)
    # The tower's own forward, asked for its tokens, and open_clip's encode_text agree.
    text = clip.tokenizer(prompts)
    tower = clip.model.text
    tower.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = tower(text)
    finally:
        tower.output_tokens = False
    torch.testing.assert_close(emb.tokens, tokens, rtol=0, atol=0)
    torch.testing.assert_close(emb.pooled, pooled, rtol=0, atol=0)
    torch.testing.assert_close(emb.pooled, clip.model.encode_text(text))
    # It conditions a text model like the plain tower does.
    tc = TextConfig(model=str(path))
    assert resolve_context_dim(None, clip, tc) == 64
    record = encoder_record(clip, tc)
    assert record["context_dim"] == 64 and record["model_config"]["custom_text"] is True
    check_encoder(clip, record)
