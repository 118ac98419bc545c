"""Volumes: the 3-D U-Net, the synthetic shapes against their analytic volumes, .npy folders,
2-D views, the statistics and MMD, and the config rule tying model.dims to the data kind."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

from diffusion_core.config import ConfigError, DataConfig, ModelConfig, parse_config
from diffusion_core.data import DatasetError, ImageDataset, load_dataset, split_dataset
from diffusion_core.data.volumes import (
    VOLUME_SHAPES,
    ShapeParams,
    analytic_volume,
    max_projections,
    mid_slices,
    shape_mask,
)
from diffusion_core.evaluation import fidelity, quality
from diffusion_core.evaluation.judge import save_classifier, train_classifier
from diffusion_core.evaluation.volumes import fill_ratio, occupancy, topology, volume_statistics
from diffusion_core.model import ModelCard
from diffusion_core.parameterization import Cond
from diffusion_core.pipeline.modality import modality
from diffusion_core.unet import UNet

SMALL: dict[str, Any] = {
    "base_channels": 8,
    "channel_mults": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (4,),
    "num_heads": 2,
}


def make3d(*, in_channels: int = 1, **overrides: Any) -> UNet:
    torch.manual_seed(0)
    net = UNet(
        in_channels=in_channels,
        out_channels=in_channels,
        image_size=8,
        dims=3,
        **{**SMALL, **overrides},
    )
    with torch.no_grad():  # the zero-initialised output conv would hide every dependence
        for p in net.conv_out.parameters():
            p.normal_(0.0, 0.05)
    return net


def volume_batch(batch: int = 2, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, 8, 8, 8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the U-Net


def test_2d_path_matches_the_image_only_implementation() -> None:
    """Golden values of the U-Net before it learnt volumes: same seed, same weights, same output
    (bit for bit on the machine that recorded them; 1e-6 allows other CPU kernels)."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        out_channels=1,
        image_size=8,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        num_classes=3,
    )
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.normal_(0.0, 0.05)
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        out = net(x, torch.tensor([3, 700]), Cond(labels=torch.tensor([0, 2])))
    assert sum(p.numel() for p in net.parameters()) == 190209
    assert out.double().sum().item() == pytest.approx(16.24913100898266, abs=1e-5)
    assert out.double().abs().sum().item() == pytest.approx(34.0010960996151, abs=1e-5)
    expected = [
        0.26110824942588806,
        0.015499651432037354,
        0.0938851460814476,
        0.2652471363544464,
        0.2793702185153961,
        0.11025456339120865,
    ]
    got = out.flatten()[[0, 17, 63, 64, 100, 127]].tolist()
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("channels", [1, 2])
def test_3d_output_shape_matches_input(channels: int) -> None:
    net = make3d(in_channels=channels)
    x = volume_batch(channels=channels)
    assert net(x, torch.tensor([5, 500])).shape == x.shape
    assert all(not isinstance(m, torch.nn.Conv2d) for m in net.modules())


def test_3d_conditioning_on_time_class_and_context() -> None:
    x = volume_batch()
    t = torch.tensor([10, 10])
    net = make3d(num_classes=3)
    with torch.no_grad():
        a = net(x, t, Cond(labels=torch.tensor([0, 0])))
        b = net(x, t, Cond(labels=torch.tensor([1, 1])))
        null = net(x, t, Cond(labels=torch.tensor([3, 3])))
        default = net(x, t)
        later = net(x, torch.tensor([900, 900]), Cond(labels=torch.tensor([0, 0])))
    assert not torch.allclose(a, b) and not torch.allclose(a, later)
    torch.testing.assert_close(null, default)  # no labels means the null class
    text = make3d(context_dim=6)
    context = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c1 = text(x, t, Cond(context=context))
        c2 = text(x, t, Cond(context=context.flip(0)))
    assert not torch.allclose(c1, c2)


def test_3d_every_parameter_gets_a_gradient() -> None:
    net = make3d(num_classes=3, context_dim=4)
    cond = Cond(labels=torch.tensor([0, 2]), context=torch.randn(2, 3, 4))
    net(volume_batch(), torch.tensor([1, 999]), cond).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_3d_attention_mixes_every_voxel() -> None:
    """A change in one corner voxel reaches the far corner: attention over D*H*W tokens (the
    convolutions alone reach only a few voxels at this depth)."""
    net = make3d(attention_resolutions=(4,))
    x = volume_batch(batch=1)
    y = x.clone()
    y[0, 0, 0, 0, 0] += 5.0
    with torch.no_grad():
        diff = (net(x, torch.tensor([50])) - net(y, torch.tensor([50]))).abs()
    assert diff[0, 0, -1, -1, -1] > 0


def test_input_rank_must_match_dims() -> None:
    with pytest.raises(ValueError, match=r"dims=3.*5-D"):
        make3d()(torch.zeros(2, 1, 8, 8), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="dims must be 2"):
        UNet(in_channels=1, out_channels=1, image_size=8, dims=4, **SMALL)


def test_model_card_reads_dims_from_config() -> None:
    cfg = ModelConfig(dims=3, base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,))
    net = ModelCard(
        model=cfg, diffusion={}, in_channels=1, image_size=8, num_classes=3, dataset_sha256="0"
    ).build()
    assert net.dims == 3 and isinstance(net.conv_in, torch.nn.Conv3d)


# ----------------------------------------------------------------------------- config


def test_dims_must_fit_the_data_kind() -> None:
    with pytest.raises(ConfigError, match=r"model\.dims=3.*data\.kind='digits'"):
        parse_config({"model": {"dims": 3}})
    with pytest.raises(ConfigError, match=r"model\.dims=2.*data\.kind='volumes'"):
        parse_config({"data": {"kind": "volumes"}})
    with pytest.raises(ConfigError, match=r"data\.root is required"):
        parse_config({"data": {"kind": "volume_folder"}, "model": {"dims": 3}})
    cfg = parse_config({"data": {"kind": "volumes"}, "model": {"dims": 3}})
    assert cfg.model.dims == 3


def test_volume_memorisation_is_in_pixel_space() -> None:
    """Volumes are safety-checked on their projections: the 3-D domain classifier cannot give
    their features, so feature-space memorisation is refused, and the default chain drops it."""
    volumes = {"data": {"kind": "volumes"}, "model": {"dims": 3}}
    chain = {"detectors": [{"name": "memorisation", "params": {"feature_space": True}}]}
    with pytest.raises(ConfigError, match=r"feature_space: true is not available for volumes"):
        parse_config({**volumes, "safety": chain})
    cfg = parse_config(volumes)
    pixel = modality(3).safety_config(cfg.safety)
    params = {d.name: d.params for d in pixel.detectors}
    assert params["memorisation"]["feature_space"] is False
    assert params["sanity"] == {d.name: d.params for d in cfg.safety.detectors}["sanity"]


# ----------------------------------------------------------------------------- synthetic shapes


def _box_count(centre: float, half: float) -> int:
    """Voxel centres k + 0.5 with |k + 0.5 - centre| <= half, counted in closed form."""
    return math.floor(centre + half - 0.5) - math.ceil(centre - half - 0.5) + 1


def test_box_mask_counts_voxel_centres_exactly() -> None:
    params = ShapeParams("box", (10.3, 12.9, 7.45), (4.2, 2.6, 5.01))
    expected = math.prod(_box_count(c, a) for c, a in zip(params.centre, params.sizes, strict=True))
    assert int(shape_mask(params, 24).sum()) == expected


@pytest.mark.parametrize(
    "params",
    [
        ShapeParams("sphere", (20.3, 19.7, 20.1), (12.0,)),
        ShapeParams("box", (20.0, 20.0, 20.0), (8.0, 5.0, 11.0)),
        ShapeParams("torus", (20.3, 19.7, 20.1), (11.0, 4.5), axis=1),
        ShapeParams("torus", (20.3, 19.7, 20.1), (11.0, 4.5), axis=2),
    ],
)
def test_large_shapes_have_their_analytic_volume(params: ShapeParams) -> None:
    """Voxel counts converge to 4/3 pi r^3, 8abc, 2 pi^2 R r^2: within 2% at these sizes."""
    count = int(shape_mask(params, 40).sum())
    assert count == pytest.approx(analytic_volume(params), rel=0.02)


def test_fill_ratio_matches_the_shapes() -> None:
    def vol(params: ShapeParams) -> torch.Tensor:
        return torch.from_numpy(shape_mask(params, 40)[None, None].astype(np.uint8) * 255)

    sphere = ShapeParams("sphere", (20.3, 19.7, 20.1), (12.0,))
    box = ShapeParams("box", (20.0, 20.0, 20.0), (8.0, 5.0, 11.0))
    torus = ShapeParams("torus", (20.3, 19.7, 20.1), (11.0, 4.5), axis=0)
    assert fill_ratio(vol(box)).item() == 1.0
    assert fill_ratio(vol(sphere)).item() == pytest.approx(math.pi / 6, rel=0.03)
    expected = math.pi**2 * 11.0 * 4.5 / (4 * (11.0 + 4.5) ** 2)
    assert fill_ratio(vol(torus)).item() == pytest.approx(expected, rel=0.03)
    assert fill_ratio(torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)).item() == 0.0


def test_topology_counts_pieces_tunnels_and_cavities() -> None:
    """Closed forms of the Euler characteristic (pieces - tunnels + cavities) and the 26-connected
    pieces: a ball and a box (1, 1); a solid torus (1, 0); a ring one voxel thick (1, 0) and the
    same ring cut open (1, 1); two boxes (2, 2) and two touching at a corner only (1, 1); a hollow
    box enclosing a cavity (1, 2); a solid torus with a cut (1, 1); nothing (0, 0)."""

    def vol(*masks: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack(masks)[:, None].astype(np.uint8) * 255)

    side = 16
    ball = shape_mask(ShapeParams("sphere", (8.0, 8.0, 8.0), (4.5,)), side)
    box = shape_mask(ShapeParams("box", (8.0, 8.0, 8.0), (3.0, 2.0, 4.0)), side)
    torus = shape_mask(ShapeParams("torus", (8.0, 8.0, 8.0), (4.5, 1.6), axis=1), side)
    ring = np.zeros((side,) * 3, dtype=bool)
    ring[4, 3:9, 3] = ring[4, 3:9, 8] = ring[4, 3, 3:9] = ring[4, 8, 3:9] = True
    cut = ring.copy()
    cut[4, 5, 8] = False
    two = np.zeros_like(ring)
    two[1:4, 1:4, 1:4] = two[8:12, 8:12, 8:12] = True
    corner = np.zeros_like(ring)
    corner[1:4, 1:4, 1:4] = corner[4:7, 4:7, 4:7] = True
    shell = np.zeros_like(ring)
    shell[2:10, 2:10, 2:10] = True
    shell[4:8, 4:8, 4:8] = False
    broken = torus.copy()
    broken[:, :, 8:10] &= np.arange(side)[:, None, None] > 8  # a slab through one side of the ring
    masks = [ball, box, torus, ring, cut, two, corner, shell, broken, np.zeros_like(ring)]
    assert topology(vol(*masks)) == [
        (1, 1), (1, 1), (1, 0), (1, 0), (1, 1), (2, 2), (1, 1), (1, 2), (1, 1), (0, 0)
    ]  # fmt: skip
    # The synthetic set: every sphere and box is one solid, every torus one ring.
    ds = load_dataset(DataConfig(kind="volumes", image_size=16, num_samples=120, split_seed=5))
    assert ds.labels is not None
    usual = {0: (1, 1), 1: (1, 1), 2: (1, 0)}
    assert all(t == usual[int(k)] for t, k in zip(topology(ds.images), ds.labels, strict=True))


def test_synthetic_volumes_are_seeded_labelled_and_of_the_expected_occupancy() -> None:
    cfg = DataConfig(kind="volumes", image_size=16, num_samples=90, split_seed=3)
    ds = load_dataset(cfg)
    assert ds.images.shape == (90, 1, 16, 16, 16) and ds.dims == 3
    assert ds.class_names == list(VOLUME_SHAPES)
    assert set(torch.unique(ds.images).tolist()) == {0, 255}
    assert set(ds.labels.tolist()) == {0, 1, 2}  # type: ignore[union-attr]
    assert ds.sha256() == load_dataset(cfg).sha256()
    assert ds.sha256() != load_dataset(cfg.model_copy(update={"split_seed": 4})).sha256()
    # Fill ratios tell the classes apart: boxes fill their bounding box, spheres about pi/6.
    fill = fill_ratio(ds.images)
    labels = ds.labels
    assert labels is not None
    assert fill[labels == 1].min() == 1.0
    assert fill[labels == 0].mean() == pytest.approx(math.pi / 6, abs=0.08)
    # Expected occupancy from the size distributions, e.g. spheres: E[4/3 pi r^3] / side^3
    # with r ~ U(0.15, 0.3) side gives pi/3 (0.3^4 - 0.15^4) / 0.15 = 0.0534.
    sphere_occ = occupancy(ds.images[labels == 0]).mean().item()
    assert sphere_occ == pytest.approx(math.pi / 3 * (0.3**4 - 0.15**4) / 0.15, rel=0.3)


def test_volume_datasets_split_and_keep_their_rank() -> None:
    ds = load_dataset(DataConfig(kind="volumes", image_size=8, num_samples=40))
    train, holdout = split_dataset(ds, holdout_fraction=0.25, seed=0)
    assert (len(train), len(holdout)) == (30, 10) and holdout.images.ndim == 5
    with pytest.raises(DatasetError, match=r"\(N, C, D, H, W\)"):
        ImageDataset(
            images=torch.zeros(1, 1, 2, 2, 2, 2, dtype=torch.uint8), labels=None, class_names=[]
        )


# ----------------------------------------------------------------------------- .npy folders


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def _write(fs: fsspec.AbstractFileSystem, path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    _put(fs, path, buffer.getvalue())


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_volume_folder_reads_classes_dtypes_and_skips_unreadable(
    protocol: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = f"{tmp_path}/vols" if protocol == "file" else f"/vols-{tmp_path.name}"
    fs = fsspec.filesystem(protocol)
    cube = np.zeros((8, 8, 8), dtype=np.uint8)
    cube[2:5] = 200
    _write(fs, f"{root}/a/one.npy", cube)
    _write(fs, f"{root}/a/two.npy", cube.astype(bool))  # bool -> 0 / 255
    _write(fs, f"{root}/b/three.npy", cube[None].astype(np.float32) / 255.0)  # (C, D, H, W)
    _write(fs, f"{root}/b/small.npy", np.full((4, 4, 4), 255, dtype=np.uint8))  # resampled
    _put(fs, f"{root}/b/broken.npy", b"not an npy file")
    _put(fs, f"{root}/b/notes.txt", b"ignored")
    url = f"{protocol}://{root}"
    with caplog.at_level(logging.WARNING, logger="diffusion_core.data.sources"):
        ds = load_dataset(DataConfig(kind="volume_folder", root=url, image_size=8))
    assert ds.class_names == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1]  # type: ignore[union-attr]
    assert ds.images.shape == (4, 1, 8, 8, 8) and ds.skipped == 1
    assert "broken.npy" in caplog.text
    assert torch.equal(ds.images[0, 0], torch.from_numpy(cube))
    assert set(torch.unique(ds.images[1]).tolist()) == {0, 255}
    assert bool((ds.images[2] == 255).all())  # small.npy sorts before three.npy
    assert torch.equal(ds.images[3, 0], torch.from_numpy(cube))  # 200 / 255 * 255 rounds to 200


def test_volume_folder_errors_name_the_file_or_url(tmp_path: Path) -> None:
    def load(root: Path) -> ImageDataset:
        return load_dataset(DataConfig(kind="volume_folder", root=str(root), image_size=8))

    with pytest.raises(DatasetError, match="volume folder not found"):
        load(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"junk: no readable volumes.*1 unreadable"):
        load(tmp_path / "junk")
    (tmp_path / "flat").mkdir()
    np.save(tmp_path / "flat" / "flat.npy", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"flat\.npy: expected a cubic volume"):
        load(tmp_path / "flat")
    (tmp_path / "hot").mkdir()
    np.save(tmp_path / "hot" / "hot.npy", np.full((8, 8, 8), 2.0, dtype=np.float32))
    with pytest.raises(DatasetError, match=r"hot\.npy: float volumes must hold finite values"):
        load(tmp_path / "hot")


# ----------------------------------------------------------------------------- views and stats


def test_slices_and_projections_match_numpy() -> None:
    rng = np.random.RandomState(0)
    v = rng.randint(0, 256, size=(3, 2, 6, 6, 6)).astype(np.uint8)
    t = torch.from_numpy(v)
    slices = mid_slices(t).numpy()
    np.testing.assert_array_equal(slices[..., :6], v[:, :, 3])
    np.testing.assert_array_equal(slices[..., 6:12], v[:, :, :, 3])
    np.testing.assert_array_equal(slices[..., 12:], v[:, :, :, :, 3])
    mips = max_projections(t).numpy()
    for i, axis in enumerate((2, 3, 4)):
        np.testing.assert_array_equal(mips[..., 6 * i : 6 * (i + 1)], v.max(axis=axis))
    assert mips.shape == (3, 2, 6, 18)


def test_occupancy_counts_voxels_above_half() -> None:
    v = torch.zeros(2, 1, 4, 4, 4, dtype=torch.uint8)
    v[0, 0, 0, 0, :3] = 128  # above 0.5
    v[0, 0, 1, 1, 1] = 127  # not above
    v[1] = 255
    assert occupancy(v).tolist() == [3 / 64, 1.0]


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageDataset, ImageDataset, Any]:
    ds = load_dataset(DataConfig(kind="volumes", image_size=8, num_samples=400))
    train, holdout = split_dataset(ds, holdout_fraction=0.5, seed=0)
    judge = train_classifier(train, holdout, epochs=5)
    folder = tmp_path_factory.mktemp("judge")
    save_classifier(judge, folder)

    def metrics(images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """What the pipeline measures of volumes: the common fidelity path on the 3-D judge's
        features, and the volume statistics."""
        extractor = fidelity.Extractor(fidelity.DOMAIN, folder, "judge")
        scores = quality.score(images, holdout.images, extractor, draws=10)
        return scores | volume_statistics(images, labels, holdout, judge)

    return train, holdout, judge, metrics


def test_kid_is_near_zero_for_the_same_set_and_grows_with_a_shift(judged: Any) -> None:
    """KID on the 3-D judge's features is the unbiased squared MMD with the cubic kernel."""
    train, holdout, judge, volume_metrics = judged
    same = volume_metrics(holdout.images, holdout.labels)
    # Closed form for identical sets: the unbiased estimate is 2 (mean off-diagonal - mean) of K.
    f = judge.features(holdout.images).double()
    k = (f @ f.T / f.shape[1] + 1) ** 3
    n = len(f)
    off_diagonal = (k.sum() - k.diagonal().sum()) / (n * (n - 1))
    # torch-fidelity computes on the float32 features: agreement to float32 rounding of K's sums
    assert same["kid"] == pytest.approx(float(2 * (off_diagonal - k.mean())), rel=2e-3)
    noise = torch.randint(0, 256, holdout.images.shape, generator=torch.Generator().manual_seed(0))
    mmds = []
    for fraction in (0.25, 0.5, 1.0):
        cut = int(fraction * len(holdout))
        shifted = torch.cat([noise[:cut].to(torch.uint8), holdout.images[cut:]])
        mmds.append(volume_metrics(shifted, None)["kid"])
    assert abs(same["kid"]) < 0.05 * mmds[-1]
    assert 0 < mmds[0] < mmds[1] < mmds[2]
    assert same["occupancy_w1"] == 0.0 and same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["occupancy_generated"] == same["occupancy_holdout"]
    # Real training volumes against a holdout half sit at the holdout-vs-holdout floor's scale.
    real = volume_metrics(train.images, None)
    assert abs(real["kid_half"] - real["kid_floor_half"]) < 0.05 * mmds[-1]
    for name in VOLUME_SHAPES:
        assert same[f"occupancy/{name}/generated"] == same[f"occupancy/{name}/holdout"]
        assert same[f"fill_ratio/{name}/generated"] == same[f"fill_ratio/{name}/holdout"]
        assert same[f"topology/{name}/generated"] == same[f"topology/{name}/holdout"] > 0.5
