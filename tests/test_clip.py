"""The open_clip loader: weights only from configured places, verified, and cached prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_core.text import ClipError, load_clip

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "clip" / "tiny-clip.json")


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
