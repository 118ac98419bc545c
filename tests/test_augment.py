from __future__ import annotations

import pytest
import torch

from diffusion_core.augment import apply_symmetries, draw_symmetries
from diffusion_core.config import parse_config
from diffusion_core.data.volumes import ShapeParams, shape_mask
from diffusion_core.training import train
from tests.test_training import toy_dataset, weights

CPU = torch.device("cpu")


def test_each_item_is_mirrored_then_its_axes_permuted():
    x = torch.arange(2 * 2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 2, 3, 3, 3)
    flips = torch.tensor([[True, False, True], [False, False, False]])
    perms = torch.tensor([[2, 0, 1], [0, 1, 2]])
    out = apply_symmetries(x, flips, perms)
    assert torch.equal(out[0], x[0].flip([1, 3]).permute(0, 3, 1, 2))
    assert torch.equal(out[1], x[1])  # the identity leaves an item as it is


def test_symmetries_are_the_48_of_the_cube_drawn_uniformly():
    """An asymmetric volume under 4,800 draws: exactly 48 distinct images, each about 100 times
    (a chi-square far below its 99.9% point for 47 degrees of freedom, 82.7)."""
    n = 4800
    gen = torch.Generator().manual_seed(0)
    flips, perms = draw_symmetries("symmetries", n, 3, generator=gen, device=CPU)
    x = torch.arange(27, dtype=torch.float32).reshape(1, 1, 3, 3, 3).expand(n, 1, 3, 3, 3)
    out = apply_symmetries(x, flips, perms)
    counts: dict[tuple[float, ...], int] = {}
    for item in out:
        key = tuple(item.flatten().tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 48
    chi2 = sum((c - n / 48) ** 2 / (n / 48) for c in counts.values())
    assert chi2 < 82.7


def test_flip_mirrors_only_x_half_the_time():
    gen = torch.Generator().manual_seed(1)
    flips, perms = draw_symmetries("flip", 2000, 2, generator=gen, device=CPU)
    assert not flips[:, 0].any() and torch.equal(perms, torch.tensor([0, 1]).expand(2000, 2))
    assert 0.45 < flips[:, 1].float().mean() < 0.55
    assert draw_symmetries("none", 4, 2, generator=gen, device=CPU) is None


def test_a_symmetry_maps_a_box_to_a_box_and_a_torus_to_a_torus():
    """The synthetic shapes keep their class: a box with half sides (a, b, c) becomes the box
    with its sides permuted, a torus around z a torus around another axis."""
    box = ShapeParams("box", (7.0, 8.0, 9.5), (2.0, 3.0, 4.0))
    x = torch.from_numpy(shape_mask(box, 16)).float()[None, None]
    out = apply_symmetries(x, torch.tensor([[True, True, False]]), torch.tensor([[2, 0, 1]]))
    # Mirrored in z and y: centres 16 - 7 = 9 and 16 - 8 = 8; then axes (x, z, y).
    moved = ShapeParams("box", (9.5, 9.0, 8.0), (4.0, 2.0, 3.0))
    assert torch.equal(out[0, 0], torch.from_numpy(shape_mask(moved, 16)).float())
    torus = ShapeParams("torus", (8.0, 8.0, 8.0), (4.0, 1.5), axis=0)
    x = torch.from_numpy(shape_mask(torus, 16)).float()[None, None]
    out = apply_symmetries(x, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([[1, 2, 0]]))
    turned = ShapeParams("torus", (8.0, 8.0, 8.0), (4.0, 1.5), axis=2)
    assert torch.equal(out[0, 0], torch.from_numpy(shape_mask(turned, 16)).float())


def test_permuting_the_axes_of_a_rectangle_is_refused():
    x = torch.zeros(1, 1, 4, 6)
    with pytest.raises(ValueError, match=r"square grid, got \(4, 6\)"):
        apply_symmetries(x, torch.zeros(1, 2, dtype=torch.bool), torch.tensor([[1, 0]]))
    flipped = apply_symmetries(x, torch.tensor([[False, True]]), torch.tensor([[0, 1]]))
    assert flipped.shape == x.shape  # mirroring alone is fine


@pytest.mark.parametrize("kind", ["flip", "symmetries"])
def test_augmented_training_resumes_exactly_and_differs_from_plain(
    tmp_path, tiny_config_dict, kind
):
    """The draws come from the trainer's saved generator: 3 + 3 resumed steps give the weights of
    6 straight ones, and they are not the weights of training without augmentation."""
    tiny_config_dict["train"].update(steps=6, checkpoint_every=100, precision="fp32")
    plain = train(parse_config(tiny_config_dict), toy_dataset(), tmp_path / "plain")
    tiny_config_dict["train"]["augment"] = kind
    cfg = parse_config(tiny_config_dict)
    straight = train(cfg, toy_dataset(), tmp_path / "a")
    train(cfg, toy_dataset(), tmp_path / "b", max_steps=3)
    resumed = train(cfg, toy_dataset(), tmp_path / "b")
    a, b = (
        weights(straight.checkpoint, "ema.safetensors"),
        weights(resumed.checkpoint, "ema.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    p = weights(plain.checkpoint, "ema.safetensors")
    assert any(not torch.equal(a[k], p[k]) for k in a)
    assert cfg.training_identity("d") != parse_config(
        {**tiny_config_dict, "train": {**tiny_config_dict["train"], "augment": "none"}}
    ).training_identity("d")
