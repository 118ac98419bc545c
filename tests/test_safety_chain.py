"""The configured safety chain end to end: entry-point plug-ins, CLIP concepts and their
calibration, and the stage that commits published/quarantined samples with an audit log."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffusion_core.config import DataConfig, DetectorConfig, SafetyConfig, load_config
from diffusion_core.io import to_pil
from diffusion_core.safety.calibrate import read_labelled_folder, threshold_for_fnr
from diffusion_core.safety.chain import build_chain, filter_images, plugin_names
from diffusion_core.safety.concepts import ConceptDetector
from diffusion_core.safety.detector import SafetyContext
from diffusion_core.text import load_clip

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = str(REPO / "configs" / "clip" / "tiny-clip.json")


def textured(n: int, means: list[float], *, seed: int = 0) -> Tensor:
    """Grey (n, 1, 8, 8) images with the given mean grey levels and a +-20 checkerboard."""
    board = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 40.0 - 20.0
    mean = torch.tensor(means).view(n, 1, 1, 1)
    return (mean + board).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- plug-ins


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny installed distribution on sys.path: the README's example module plus a
    ``*.dist-info`` folder declaring it in the ``diffpipe.detectors`` entry point group."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "examples" / "brightness_detector.py", site / "brightness_detector.py")
    (site / "broken_detector.py").write_text("raise ImportError('needs a GPU driver')\n")
    dist = site / "diffpipe_brightness-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: diffpipe-brightness\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        "[diffpipe.detectors]\n"
        "brightness = brightness_detector:BrightnessDetector\n"
        "broken = broken_detector:Detector\n"
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in ("brightness_detector", "broken_detector"):
        sys.modules.pop(module, None)


def test_entry_point_plugin_loads_by_name_from_config_and_runs(plugin_site: Path) -> None:
    assert {"brightness", "broken"} <= set(plugin_names())
    config = SafetyConfig(
        detectors=(
            DetectorConfig(name="sanity"),
            DetectorConfig(name="brightness", params={"max_mean": 150.0}),
        )
    )
    means = [40.0, 120.0, 180.0, 230.0]
    images = textured(4, means)
    decision = filter_images(images, SafetyContext(), build_chain(config))

    assert decision.published.tolist() == [True, True, False, False]
    assert not decision.failures
    for record, mean in zip(decision.records, means, strict=True):
        assert record["scores"]["brightness"] == pytest.approx(mean)
        assert record["thresholds"]["brightness"] == 150.0
    assert decision.records[2]["reasons"] == ["brightness: mean brightness 180.0 > 150"]
    assert decision.flag_rates()["brightness"] == 0.5


def test_a_plugin_that_fails_to_load_quarantines_the_batch(plugin_site: Path) -> None:
    config = SafetyConfig(detectors=(DetectorConfig(name="sanity"), DetectorConfig(name="broken")))
    decision = filter_images(textured(3, [50.0] * 3), SafetyContext(), build_chain(config))
    assert not bool(decision.published.any())
    reason = decision.records[0]["reasons"][0]
    assert reason == "detector broken failed: SafetyError: misconfigured: needs a GPU driver"


# ----------------------------------------------------------------------------- concepts


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fixed random-weight tiny CLIP, written as the weights file a user would configure."""
    torch.manual_seed(7)
    state = load_clip(TINY_CLIP).model.state_dict()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(state, path)
    return str(path)


def smooth_images(n: int, *, seed: int, tint: tuple[float, float, float]) -> Tensor:
    """(n, 3, 32, 32) uint8: coarse random colour fields, tinted; a continuous family whose
    CLIP scores vary smoothly from image to image."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=gen) * torch.tensor(tint).view(1, 3, 1, 1)
    return (F.interpolate(coarse, size=32, mode="bilinear") * 255).round().to(torch.uint8)


def concept_params(weights: str, thresholds: dict[str, float]) -> dict:
    prompts = {"red": ["a red picture"], "stripes": ["stripes", "a striped pattern"]}
    return {
        "model": TINY_CLIP,
        "pretrained": weights,
        "concepts": [
            {"name": name, "prompts": prompts[name], "threshold": t}
            for name, t in thresholds.items()
        ],
    }


def test_concept_scores_are_max_cosine_over_prompts_and_flag_at_threshold(
    clip_weights: str,
) -> None:
    images = smooth_images(40, seed=0, tint=(1.0, 0.6, 0.6))
    single = ConceptDetector(
        model=TINY_CLIP,
        pretrained=clip_weights,
        concepts=[
            {"name": "a", "prompts": "stripes", "threshold": 1.0},
            {"name": "b", "prompts": ["a striped pattern"], "threshold": 1.0},
        ],
    ).scores(images)
    # Oracle: cosine similarity computed here from the loaded model's embeddings.
    clip = load_clip(TINY_CLIP, clip_weights)
    cos_a = clip.image_features(images) @ clip.text_features(["stripes"]).T
    torch.testing.assert_close(single["a"], cos_a[:, 0])

    both = torch.maximum(single["a"], single["b"])
    median = float(both.median())
    detector = ConceptDetector(
        **concept_params(clip_weights, {"stripes": median, "red": 1.0})  # red: never reached
    )
    result = detector(images, SafetyContext())
    assert isinstance(result.scores, dict)
    torch.testing.assert_close(result.scores["stripes"], both)
    assert result.flagged.tolist() == (both >= median).tolist()
    assert result.threshold == {"stripes": median, "red": 1.0}
    i = int(torch.nonzero(result.flagged)[0])
    assert result.reasons[i] == f"concept stripes {float(both[i]):.3f} >= {median:.3f}"


def test_threshold_for_fnr_misses_at_most_the_target_fraction() -> None:
    scores = torch.randperm(200).double() / 10  # distinct values 0.0 .. 19.9
    for target in (0.0, 0.05, 0.1, 0.333):
        t = threshold_for_fnr(scores, target)
        misses = int((scores < t).sum())
        assert misses == math.floor(target * 200)  # at most the target, and no fewer
    with pytest.raises(ValueError, match="target FNR"):
        threshold_for_fnr(scores, 1.0)


def write_labelled(root: Path, *, seed: int, n_unsafe: int, n_safe: int) -> None:
    families = {
        "safe": (0.5, 0.9, 1.0),
        "unsafe/red": (1.0, 0.3, 0.3),
        "unsafe/stripes": (0.8, 0.8, 0.8),
    }
    for offset, (folder, tint) in enumerate(families.items()):
        out = root / folder
        out.mkdir(parents=True)
        n = n_safe if folder == "safe" else n_unsafe
        for i, image in enumerate(smooth_images(n, seed=seed * 10 + offset, tint=tint)):
            to_pil(image).save(out / f"{i:04d}.png")


def test_calibrated_thresholds_reproduce_the_target_fnr_on_held_out_data(
    clip_weights: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffpipe.flows.cli import main

    n_unsafe, n_safe, target = 400, 200, 0.1
    write_labelled(tmp_path / "calibration", seed=1, n_unsafe=n_unsafe, n_safe=n_safe)
    write_labelled(tmp_path / "held-out", seed=2, n_unsafe=n_unsafe, n_safe=n_safe)
    config = tmp_path / "run.yaml"
    params = concept_params(clip_weights, {"red": 0.5, "stripes": 0.5})
    detectors = [{"name": "sanity"}, {"name": "concept", "params": params}]
    config.write_text(yaml.safe_dump({"name": "cal", "safety": {"detectors": detectors}}))
    out = tmp_path / "calibrated" / "run.yaml"
    args = ["calibrate-safety", "--data", str(tmp_path / "calibration"), "--config", str(config)]
    assert main([*args, "--target-fnr", str(target), "--out", str(out)]) == 0
    assert "red: threshold" in capsys.readouterr().out

    # The written config is a valid run config; its header and sibling report give the rates.
    text = out.read_text()
    assert text.startswith("# safety.detectors[concept] thresholds calibrated")
    report = json.loads((out.parent / "run.yaml.calibration.json").read_text())
    calibrated = load_config(out)
    spec = calibrated.safety.detectors[1]
    thresholds = {c["name"]: c["threshold"] for c in spec.params["concepts"]}
    assert set(thresholds) == {"red", "stripes"} and 0.5 not in thresholds.values()
    for name, entry in report["concepts"].items():
        assert entry["fnr"] == math.floor(target * n_unsafe) / n_unsafe  # exact on its own set
        assert f"{name}: threshold {entry['threshold']:.6f}, FNR {entry['fnr']:.4f}" in text

    # Held out: the same families, fresh images, judged by the chain built from the new config.
    safe, unsafe = read_labelled_folder(tmp_path / "held-out", size=32)
    chain = build_chain(calibrated.safety)
    sigma = math.sqrt(target * (1 - target) * (2 / n_unsafe))  # both sets' binomial error
    for name, images in unsafe.items():
        decision = filter_images(images, SafetyContext(), chain)
        scores = torch.tensor([r["scores"]["concept"][name] for r in decision.records])
        fnr = float((scores < thresholds[name]).double().mean())
        print(f"{name}: held-out FNR {fnr:.3f} (target {target}, sigma {sigma:.3f})")
        assert abs(fnr - target) <= 3 * sigma, (name, fnr)
    decision = filter_images(safe, SafetyContext(), chain)
    assert len(decision.records) == n_safe


def test_calibration_refuses_unconfigured_concepts(clip_weights: str, tmp_path: Path) -> None:
    from diffpipe.flows.cli import main

    write_labelled(tmp_path / "data", seed=1, n_unsafe=5, n_safe=5)
    config = tmp_path / "run.yaml"
    params = concept_params(clip_weights, {"red": 0.5})
    config.write_text(
        yaml.safe_dump({"safety": {"detectors": [{"name": "concept", "params": params}]}})
    )
    out = tmp_path / "out.yaml"
    args = ["calibrate-safety", "--data", str(tmp_path / "data"), "--config", str(config)]
    assert main([*args, "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob("out.yaml*"))


# ----------------------------------------------------------------------------- the stage


def test_stage_commits_published_quarantine_and_one_audit_line_per_sample(
    tmp_path: Path, clip_weights: str
) -> None:
    from diffusion_core.pipeline.stages.dataset import prepare_dataset, read_split
    from diffusion_core.pipeline.stages.safety import safety_filter
    from diffusion_core.pipeline.store import ArtefactStore

    store = ArtefactStore(f"file://{tmp_path / 'store'}")
    dataset = prepare_dataset(DataConfig(image_size=8), store)
    train = read_split(store, dataset, "train")
    holdout = read_split(store, dataset, "holdout")
    images = torch.cat(
        [holdout.images[:20], train.images[:6], torch.zeros((2, 1, 8, 8), dtype=torch.uint8)]
    )
    n = len(images)
    shard = tmp_path / "shard"
    shard.mkdir()
    save_file(
        {"images": images, "labels": torch.zeros(n, dtype=torch.long), "seeds": torch.arange(n)},
        shard / "images.safetensors",
    )
    store.put_dir("runs/r/samples/shard-00000", shard)
    safety = SafetyConfig(
        detectors=(
            DetectorConfig(name="sanity"),
            DetectorConfig(name="memorisation", params={"feature_space": False}),
            DetectorConfig(name="concept", params=concept_params(clip_weights, {"red": 1.0})),
            DetectorConfig(name="brightness", enabled=False),  # not installed, not enabled
        )
    )
    ref = safety_filter(
        store, ["runs/r/samples/shard-00000"], dataset, out_prefix="runs/r/safety", safety=safety
    )

    local = tmp_path / "out"
    store.get_dir("runs/r/safety", local)
    audit = [json.loads(line) for line in (local / "audit.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in audit] == list(range(n))
    for record in audit:
        assert set(record["scores"]) == {"sanity", "memorisation", "concept"}
        assert all(v is not None for v in record["scores"].values())
    published = load_file(local / "published.safetensors")
    quarantine = load_file(local / "quarantine" / "images.safetensors")
    records = (local / "quarantine" / "records.jsonl").read_text().splitlines()
    held = [json.loads(line) for line in records]
    flagged_ids = [r["sample_id"] for r in audit if r["decision"] == "quarantine"]
    assert quarantine["sample_ids"].tolist() == flagged_ids == [r["sample_id"] for r in held]
    assert all(r["reasons"] for r in held)
    assert set(range(20, 28)) <= set(flagged_ids)  # the 6 training images and 2 blanks
    assert torch.equal(quarantine["images"], images[flagged_ids])  # stored unmodified
    assert ref.published + ref.quarantined == n == len(published["images"]) + len(flagged_ids)
    assert ref.flag_counts["sanity"] == 2 and ref.flag_counts["memorisation"] >= 6
    assert ref.flag_rates["concept"] == 0.0 and ref.failures == {}
    summary = json.loads((local / "summary.json").read_text())
    assert summary["flag_rates"] == ref.flag_rates
