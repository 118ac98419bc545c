"""Dataset loaders, content hash and split; everything offline (S3 is a local moto server)."""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_core.config import DataConfig, DatasetKind
from diffusion_core.data import DATASETS, DatasetError, ImageDataset, load_dataset, split_dataset
from diffusion_core.data.shapes import SHAPE_BACKGROUND, SHAPE_COLOURS, SHAPE_POSITIONS
from diffusion_core.data.sources import load_folder

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ----------------------------------------------------------------------------- helpers


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def solid(colour: tuple[int, ...] | int, size: tuple[int, int] = (12, 12)) -> Image.Image:
    mode = "L" if isinstance(colour, int) else "RGB"
    return Image.new(mode, size, colour)


def noise_png(seed: int = 0) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def corrupt_bytes() -> bytes:
    return np.random.RandomState(1).bytes(300)


def truncated_png() -> bytes:
    data = noise_png(2)
    return data[: len(data) // 2]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_class_folder(root: Path) -> None:
    """cat: 3 readable (red) + 1 corrupt; dog: 2 readable (blue) + 1 truncated; 1 non-image."""
    write(root / "cat" / "a.png", png_bytes(solid(RED)))
    write(root / "cat" / "b.PNG", png_bytes(solid(RED, (20, 12))))
    write(root / "cat" / "c.jpg", png_bytes(solid(RED), "JPEG"))
    write(root / "cat" / "broken.png", corrupt_bytes())
    write(root / "dog" / "d.bmp", png_bytes(solid(BLUE), "BMP"))
    write(root / "dog" / "e.webp", png_bytes(solid(BLUE), "WEBP"))
    write(root / "dog" / "cut.png", truncated_png())
    write(root / "dog" / "notes.txt", b"not an image")


def folder_cfg(root: str, **overrides: Any) -> DataConfig:
    return DataConfig(
        kind="folder", root=root, image_size=overrides.pop("image_size", 8), **overrides
    )


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------- registry


def test_every_config_kind_has_a_loader() -> None:
    assert set(DATASETS) == set(get_args(DatasetKind))


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtype_labels_and_range() -> None:
    ds = load_dataset(DataConfig(kind="digits", image_size=16))
    assert ds.images.shape == (1797, 1, 16, 16)
    assert ds.images.dtype == torch.uint8
    assert ds.labels is not None and ds.labels.dtype == torch.long
    assert ds.labels.shape == (1797,)
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.captions is None and ds.skipped == 0
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    x = ds.to_float()
    assert x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_digits_native_size_is_scaled_raw_data_and_resize_is_antialiased() -> None:
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) * (255.0 / 16.0)
    native = load_dataset(DataConfig(kind="digits", image_size=8))
    assert torch.equal(native.images[:, 0], raw.round().to(torch.uint8))

    small = load_dataset(DataConfig(kind="digits", image_size=4))
    expected = F.interpolate(raw.unsqueeze(1), size=(4, 4), mode="bilinear", antialias=True)
    assert torch.equal(small.images, expected.round().clamp(0, 255).to(torch.uint8))


def test_digits_three_channels_repeat_grey() -> None:
    grey = load_dataset(DataConfig(kind="digits", image_size=8))
    rgb = load_dataset(DataConfig(kind="digits", image_size=8, channels=3))
    assert rgb.images.shape == (1797, 3, 8, 8)
    for c in range(3):
        assert torch.equal(rgb.images[:, c], grey.images[:, 0])


# ----------------------------------------------------------------------------- split


def test_digits_default_split_is_297_holdout_1500_train() -> None:
    cfg = DataConfig(kind="digits", image_size=8)
    ds = load_dataset(cfg)
    train, holdout = split_dataset(ds, holdout_fraction=cfg.holdout_fraction, seed=cfg.split_seed)
    assert (len(holdout), len(train)) == (297, 1500)
    perm = np.random.RandomState(cfg.split_seed).permutation(len(ds))
    assert torch.equal(holdout.images, ds.images[torch.as_tensor(perm[:297])])
    assert torch.equal(train.labels, ds.labels[torch.as_tensor(perm[297:])])


def test_split_is_deterministic_and_disjoint() -> None:
    n = 50
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    ds = ImageDataset(
        images=images,
        labels=torch.arange(n) % 5,
        class_names=list("abcde"),
        captions=[f"image {i}" for i in range(n)],
    )
    train, holdout = split_dataset(ds, holdout_fraction=0.2, seed=3)
    again_train, again_holdout = split_dataset(ds, holdout_fraction=0.2, seed=3)
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(holdout.images, again_holdout.images)

    train_ids = set(train.images[:, 0, 0, 0].tolist())
    holdout_ids = set(holdout.images[:, 0, 0, 0].tolist())
    assert len(holdout_ids) == 10 and len(train_ids) == 40
    assert train_ids.isdisjoint(holdout_ids)
    assert train_ids | holdout_ids == set(range(n))
    # labels and captions travel with their images
    assert holdout.captions == [f"image {i}" for i in holdout.images[:, 0, 0, 0].tolist()]
    assert torch.equal(holdout.labels, holdout.images[:, 0, 0, 0].long() % 5)

    _, other_holdout = split_dataset(ds, holdout_fraction=0.2, seed=4)
    assert set(other_holdout.images[:, 0, 0, 0].tolist()) != holdout_ids


def test_split_refuses_an_empty_side() -> None:
    ds = ImageDataset(
        images=torch.zeros(2, 1, 2, 2, dtype=torch.uint8), labels=None, class_names=[]
    )
    with pytest.raises(DatasetError, match="empty holdout"):
        split_dataset(ds, holdout_fraction=0.1, seed=0)


# ----------------------------------------------------------------------------- ImageDataset


def tiny_dataset() -> ImageDataset:
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2)
    return ImageDataset(images=images, labels=torch.tensor([0, 1]), class_names=["x", "y"])


def test_sha256_is_pinned_and_stable() -> None:
    # a fixed value: the hash must not depend on the process, platform word order or run
    assert tiny_dataset().sha256() == tiny_dataset().sha256()
    assert tiny_dataset().sha256() == (
        "0e237d115bf420b95d4c3b58690cd5243552de75ddfe82e39cea70f5c3dce563"
    )


def test_sha256_is_sensitive_to_pixels_labels_and_class_names() -> None:
    base = tiny_dataset()
    pixel = base.images.clone()
    pixel[1, 2, 1, 1] += 1
    variants = [
        ImageDataset(images=pixel, labels=base.labels, class_names=base.class_names),
        ImageDataset(images=base.images, labels=torch.tensor([1, 1]), class_names=["x", "y"]),
        ImageDataset(images=base.images, labels=base.labels, class_names=["x", "z"]),
        ImageDataset(images=base.images, labels=None, class_names=[]),
    ]
    hashes = {base.sha256(), *(v.sha256() for v in variants)}
    assert len(hashes) == 5


def test_digits_sha256_stable_across_loads() -> None:
    cfg = DataConfig(kind="digits", image_size=8)
    assert load_dataset(cfg).sha256() == load_dataset(cfg).sha256()


def test_subset_and_to_float() -> None:
    ds = tiny_dataset()
    sub = ds.subset([1])
    assert len(sub) == 1 and sub.labels.tolist() == [1]
    assert torch.equal(sub.images[0], ds.images[1])
    full = ImageDataset(
        images=torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2),
        labels=None,
        class_names=[],
    )
    assert full.to_float().flatten().tolist() == [-1.0, 1.0]


def test_image_dataset_rejects_bad_tensors() -> None:
    with pytest.raises(DatasetError, match="uint8"):
        ImageDataset(images=torch.zeros(1, 1, 2, 2), labels=None, class_names=[])
    with pytest.raises(DatasetError, match="labels"):
        ImageDataset(
            images=torch.zeros(1, 1, 2, 2, dtype=torch.uint8),
            labels=torch.tensor([3]),
            class_names=["a"],
        )


# ----------------------------------------------------------------------------- folder


def test_class_folder_skips_and_counts_unreadable_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_class_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="diffusion_core.data.sources"):
        ds = load_dataset(folder_cfg(str(tmp_path)))
    assert len(ds) == 5
    assert ds.skipped == 2
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.images.shape == (5, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.captions is None
    assert ds.source == str(tmp_path)
    red = torch.tensor(RED, dtype=torch.float32).view(3, 1, 1)
    blue = torch.tensor(BLUE, dtype=torch.float32).view(3, 1, 1)
    assert (ds.images[:3].float() - red).abs().max() <= 3  # JPEG is lossy
    assert (ds.images[3:].float() - blue).abs().max() <= 3
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 2" in warning and "broken.png" in warning and "cut.png" in warning


def test_folder_center_crops_and_resizes(tmp_path: Path) -> None:
    wide = Image.new("RGB", (30, 10), BLUE)
    wide.paste(Image.new("RGB", (10, 10), RED), (10, 0))  # red square in the middle third
    tall = Image.new("RGB", (10, 30), GREEN)
    tall.paste(Image.new("RGB", (10, 10), RED), (0, 10))
    write(tmp_path / "wide.png", png_bytes(wide))
    write(tmp_path / "tall.png", png_bytes(tall))
    ds = load_dataset(folder_cfg(str(tmp_path), image_size=6))
    assert ds.images.shape == (2, 3, 6, 6)
    expected = torch.tensor(RED, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 6, 6)
    assert torch.equal(ds.images, expected)


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    write(tmp_path / "one.png", png_bytes(solid(RED)))
    write(tmp_path / "two.png", png_bytes(solid(GREEN)))
    write(tmp_path / "two[1].png", png_bytes(solid(BLUE)))  # glob characters in a file name
    ds = load_dataset(folder_cfg(f"file://{tmp_path}"))
    assert len(ds) == 3 and ds.skipped == 0
    assert ds.labels is None and ds.class_names == [] and ds.captions is None
    assert ds.images[0, :, 0, 0].tolist() == list(RED)
    assert ds.images[1, :, 0, 0].tolist() == list(GREEN)
    assert ds.images[2, :, 0, 0].tolist() == list(BLUE)


def test_folder_channels_follow_the_images_unless_configured(tmp_path: Path) -> None:
    write(tmp_path / "a.png", png_bytes(solid(200)))
    write(tmp_path / "b.png", png_bytes(solid(50)))
    grey = load_dataset(folder_cfg(str(tmp_path)))
    assert grey.images.shape == (2, 1, 8, 8)
    assert grey.images[:, 0, 0, 0].tolist() == [200, 50]
    forced = load_dataset(folder_cfg(str(tmp_path), channels=3))
    assert forced.images.shape == (2, 3, 8, 8)

    write(tmp_path / "c.png", png_bytes(solid(RED)))
    mixed = load_dataset(folder_cfg(str(tmp_path)))
    assert mixed.images.shape == (3, 3, 8, 8)
    as_grey = load_dataset(folder_cfg(str(tmp_path), channels=1))
    assert as_grey.images.shape == (3, 1, 8, 8)
    assert as_grey.images[2, 0, 0, 0].item() == 76  # ITU-R 601 luma of pure red


def test_captions_csv(tmp_path: Path) -> None:
    write(tmp_path / "one.png", png_bytes(solid(RED)))
    write(tmp_path / "two.png", png_bytes(solid(GREEN)))
    (tmp_path / "captions.csv").write_text(
        'file,caption\ntwo.png,"a green, flat square"\none.png,a red square\n'
    )
    ds = load_dataset(folder_cfg(str(tmp_path)))
    assert ds.captions == ["a red square", "a green, flat square"]


def test_captions_jsonl_with_class_folders(tmp_path: Path) -> None:
    make_class_folder(tmp_path)
    write(tmp_path / "dog" / "a.png", png_bytes(solid(BLUE)))  # same name as cat/a.png
    records = [
        {"file": "cat/a.png", "caption": "cat a"},
        {"file": "dog/a.png", "caption": "dog a"},
        {"file": "cat/b.PNG", "caption": "cat b"},
        {"file": "c.jpg", "caption": "cat c"},  # a bare file name also matches
        {"file": "dog/d.bmp", "caption": "dog d"},
        {"file": "dog/e.webp", "caption": "dog e"},
        {"file": "cat/broken.png", "caption": "never loaded"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ds = load_dataset(folder_cfg(str(tmp_path)))
    assert ds.captions == ["cat a", "cat b", "cat c", "dog a", "dog d", "dog e"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_malformed_captions_name_the_file(tmp_path: Path) -> None:
    write(tmp_path / "one.png", png_bytes(solid(RED)))
    (tmp_path / "captions.jsonl").write_text('{"file": "one.png", "caption": "ok"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"captions\.jsonl:2"):
        load_dataset(folder_cfg(str(tmp_path)))
    (tmp_path / "captions.jsonl").unlink()
    (tmp_path / "captions.csv").write_text("name,text\none.png,hi\n")
    with pytest.raises(DatasetError, match=r"captions\.csv.*'file' and 'caption'"):
        load_dataset(folder_cfg(str(tmp_path)))


def test_links_leaving_the_root_are_refused_unless_allowed(tmp_path: Path) -> None:
    """A file or a folder linked from outside data.root is an error naming the link; links that
    stay inside are read; data.follow_symlinks reads them all."""
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    write(root / "one.png", png_bytes(solid(RED)))
    (root / "again.png").symlink_to(root / "one.png")  # inside: fine
    assert len(load_dataset(folder_cfg(str(root)))) == 2
    write(outside / "secret.png", png_bytes(solid(GREEN)))
    (root / "leak.png").symlink_to(outside / "secret.png")
    with pytest.raises(DatasetError, match=rf"{root / 'leak.png'}: a symbolic link to .*secret"):
        load_dataset(folder_cfg(str(root)))
    (root / "leak.png").unlink()
    write(outside / "more" / "x.png", png_bytes(solid(BLUE)))
    (root / "linked").symlink_to(outside / "more", target_is_directory=True)
    with pytest.raises(DatasetError, match=rf"{root / 'linked'}: .*data.follow_symlinks"):
        load_dataset(folder_cfg(str(root)))
    allowed = load_dataset(folder_cfg(str(root), follow_symlinks=True))
    assert len(allowed) == 1 and allowed.class_names == ["linked"]  # a class folder wins


def test_captions_rows_naming_no_image_are_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "data" / "one.png", png_bytes(solid(RED)))
    write(tmp_path / "data" / "two.png", png_bytes(solid(GREEN)))
    write(tmp_path / "one.png", png_bytes(solid(BLUE)))  # beside the root, not in it
    (tmp_path / "data" / "captions.csv").write_text(
        "file,caption\n"
        "two.png,green\n"
        "ghost.png,never there\n"
        "../one.png,outside\n"
        "/etc/passwd,absolute\n"
    )
    with caplog.at_level(logging.WARNING, logger="diffusion_core.data.sources"):
        ds = load_dataset(folder_cfg(str(tmp_path / "data")))
    assert ds.captions == ["", "green"]  # one.png's caption is not taken from ../one.png
    assert ds.skipped == 3
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 3 captions row(s) naming no image" in warning
    for named in ("ghost.png (no such image)", "../one.png (outside", "/etc/passwd (outside"):
        assert named in warning


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "images"
    with pytest.raises(DatasetError, match="not found") as info:
        load_dataset(folder_cfg(str(missing)))
    assert str(missing) in str(info.value)


def test_all_corrupt_folder_is_an_error_naming_url_and_count(tmp_path: Path) -> None:
    write(tmp_path / "x.png", corrupt_bytes())
    write(tmp_path / "y.jpg", truncated_png())
    with pytest.raises(DatasetError, match="no readable images") as info:
        load_dataset(folder_cfg(str(tmp_path)))
    assert str(tmp_path) in str(info.value)
    assert "2 unreadable" in str(info.value)


# ----------------------------------------------------------------------------- torchvision


def idx_bytes(array: np.ndarray) -> bytes:
    """An array of uint8 in the big-endian IDX format MNIST ships in."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(
    root: Path, folder: str, *, n_train: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    raw = root / folder / "raw"
    train_images = rng.randint(0, 256, (n_train, 28, 28), dtype=np.uint8)
    train_labels = rng.randint(0, 10, n_train).astype(np.uint8)
    write(raw / "train-images-idx3-ubyte", idx_bytes(train_images))
    write(raw / "train-labels-idx1-ubyte", idx_bytes(train_labels))
    write(raw / "t10k-images-idx3-ubyte", idx_bytes(train_images[:3] // 2))
    write(raw / "t10k-labels-idx1-ubyte", idx_bytes(train_labels[:3]))
    return train_images, train_labels


@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_missing_files_without_download(
    tmp_path: Path, kind: str, no_network: None
) -> None:
    cfg = DataConfig(kind=kind, root=str(tmp_path), download=False)
    with pytest.raises(DatasetError) as info:
        load_dataset(cfg)
    message = str(info.value)
    assert str(tmp_path) in message and "data.download: true" in message
    assert list(tmp_path.iterdir()) == []  # nothing fetched or created


@pytest.mark.parametrize(
    ("kind", "folder", "first_class"),
    [("mnist", "MNIST", "0 - zero"), ("fashion_mnist", "FashionMNIST", "T-shirt/top")],
)
def test_torchvision_reads_raw_idx_files(
    tmp_path: Path, kind: str, folder: str, first_class: str, no_network: None
) -> None:
    images, labels = write_fake_mnist(tmp_path, folder)
    native = load_dataset(DataConfig(kind=kind, root=str(tmp_path), image_size=28))
    assert native.images.shape == (12, 1, 28, 28) and native.images.dtype == torch.uint8
    assert torch.equal(native.images[:, 0], torch.from_numpy(images))  # train split, unchanged
    assert native.labels.tolist() == labels.tolist()
    assert len(native.class_names) == 10 and native.class_names[0] == first_class

    small = load_dataset(DataConfig(kind=kind, root=str(tmp_path), image_size=14, channels=3))
    expected = F.interpolate(
        torch.from_numpy(images).float().unsqueeze(1),
        size=(14, 14),
        mode="bilinear",
        antialias=True,
    )
    assert small.images.shape == (12, 3, 14, 14)
    assert torch.equal(small.images[:, 1:2], expected.round().clamp(0, 255).to(torch.uint8))


# ----------------------------------------------------------------------------- shapes


def test_shapes_are_deterministic_and_seeded() -> None:
    cfg = DataConfig(kind="shapes", image_size=16, num_samples=40, split_seed=7)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.sha256() == b.sha256() and a.captions == b.captions
    other = load_dataset(cfg.model_copy(update={"split_seed": 8}))
    assert other.sha256() != a.sha256()
    assert a.images.shape == (40, 3, 16, 16) and a.class_names == ["square", "circle", "triangle"]


def test_shapes_captions_match_labels_colours_and_positions() -> None:
    ds = load_dataset(DataConfig(kind="shapes", image_size=32, num_samples=60, split_seed=1))
    assert ds.labels is not None and ds.captions is not None
    assert set(ds.labels.tolist()) == {0, 1, 2}
    areas: dict[str, list[int]] = {name: [] for name in ds.class_names}
    for image, label, caption in zip(ds.images, ds.labels.tolist(), ds.captions, strict=True):
        shape = ds.class_names[label]
        colour = next(c for c in SHAPE_COLOURS if f" {c} " in f" {caption} ")
        position = next(p for p in SHAPE_POSITIONS if caption.endswith(f" the {p}"))
        assert f"{colour} {shape}" in caption
        foreground = (image != torch.tensor(SHAPE_BACKGROUND).view(3, 1, 1)).any(dim=0)
        pixels = image[:, foreground]
        assert torch.equal(pixels, torch.tensor(SHAPE_COLOURS[colour]).view(3, 1).expand_as(pixels))
        ys, xs = torch.nonzero(foreground, as_tuple=True)
        centre = (xs.float().mean().item() + 0.5) / 32, (ys.float().mean().item() + 0.5) / 32
        nearest = min(
            SHAPE_POSITIONS,
            key=lambda p: (
                (SHAPE_POSITIONS[p][0] - centre[0]) ** 2 + (SHAPE_POSITIONS[p][1] - centre[1]) ** 2
            ),
        )
        assert nearest == position
        areas[shape].append(int(foreground.sum()))
    # squares cover more than circles, circles more than triangles of the same extent
    assert min(areas["square"]) > max(areas["circle"]) > 0
    assert min(areas["circle"]) > max(areas["triangle"]) > 0


def test_shapes_greyscale() -> None:
    ds = load_dataset(DataConfig(kind="shapes", image_size=8, num_samples=10, channels=1))
    assert ds.images.shape == (10, 1, 8, 8)
    assert ds.captions is not None
    assert not any(c in caption.split() for caption in ds.captions for c in SHAPE_COLOURS)


# ----------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


def upload_bucket(endpoint: str, bucket: str, files: dict[str, bytes]) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True
    )
    fs.mkdir(bucket)
    fs.pipe({f"{bucket}/{key}": data for key, data in files.items()})


def s3_files() -> dict[str, bytes]:
    return {
        "set/cat/a.png": png_bytes(solid(RED)),
        "set/cat/b.png": png_bytes(solid(RED)),
        "set/cat/bad.png": corrupt_bytes(),
        "set/dog/c.png": png_bytes(solid(BLUE)),
        "set/captions.jsonl": b'{"file": "cat/a.png", "caption": "red a"}\n'
        b'{"file": "cat/b.png", "caption": "red b"}\n{"file": "dog/c.png", "caption": "blue c"}\n',
    }


def test_folder_on_s3_with_storage_options(s3_env: str) -> None:
    upload_bucket(s3_env, "images-opts", s3_files())
    ds = load_folder(folder_cfg("s3://images-opts/set"), storage_options={"endpoint_url": s3_env})
    assert len(ds) == 3 and ds.skipped == 1
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    assert ds.captions == ["red a", "red b", "blue c"]
    assert ds.images[2, :, 0, 0].tolist() == list(BLUE)
    assert ds.source == "s3://images-opts/set"


def test_folder_on_s3_endpoint_from_environment(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_bucket(s3_env, "images-env", s3_files())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    # botocore would read AWS_ENDPOINT_URL by itself; turn that off so the loader must pass it
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    ds = load_dataset(folder_cfg("s3://images-env/set/"))
    assert len(ds) == 3 and ds.skipped == 1
    with pytest.raises(DatasetError, match="s3://images-env/missing"):
        load_dataset(folder_cfg("s3://images-env/missing"))
