"""Safety filter: detectors on real digits, fail-closed decisions, audit records, registry."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from diffusion_core.config import DataConfig, DetectorConfig, SafetyConfig
from diffusion_core.data import ImageDataset, load_dataset, split_dataset
from diffusion_core.evaluation.judge import TrainedClassifier, train_classifier
from diffusion_core.safety.chain import BUILT_IN, build_chain, filter_images
from diffusion_core.safety.detector import DetectorResult, SafetyContext, SafetyError
from diffusion_core.safety.memorisation import MemorisationDetector
from diffusion_core.safety.sanity import InvalidImageDetector


@pytest.fixture(scope="module", params=[(16, None), (32, 3)], ids=["16px-grey", "32px-rgb"])
def digits_split(request: pytest.FixtureRequest) -> tuple[ImageDataset, ImageDataset]:
    size, channels = request.param
    cfg = DataConfig(image_size=size, channels=channels)
    return split_dataset(
        load_dataset(cfg), holdout_fraction=cfg.holdout_fraction, seed=cfg.split_seed
    )


@pytest.fixture(scope="module")
def digits16() -> tuple[ImageDataset, ImageDataset]:
    cfg = DataConfig()
    return split_dataset(
        load_dataset(cfg), holdout_fraction=cfg.holdout_fraction, seed=cfg.split_seed
    )


@pytest.fixture(scope="module")
def judge16(digits16: tuple[ImageDataset, ImageDataset]) -> TrainedClassifier:
    """The domain classifier (a few epochs: its features need only separate digits)."""
    train, holdout = digits16
    return train_classifier(train, holdout, epochs=3)


def chain(*names: str, **params: dict[str, object]) -> list:
    specs = [DetectorConfig(name=n, params=params.get(n, {})) for n in names]
    return build_chain(SafetyConfig(detectors=tuple(specs)))


def noised(images: Tensor, sigma: float, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(images.shape, generator=gen)
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def rate(mask: Tensor) -> float:
    return float(mask.float().mean())


class Fixed:
    """A detector that returns a canned result (or raises), for the fail-closed rules."""

    def __init__(self, name: str, result: object = None, error: Exception | None = None) -> None:
        self.name = name
        self.result = result
        self.error = error

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


def passing(n: int) -> DetectorResult:
    return DetectorResult(
        scores=torch.ones(n), flagged=torch.zeros(n, dtype=torch.bool), reasons=[None] * n
    )


# ----------------------------------------------------------------------------- memorisation


def test_memorisation_flags_copies_and_noised_copies_not_fresh_digits(
    digits_split: tuple[ImageDataset, ImageDataset],
) -> None:
    """Pixel space only, at both sizes: training images slipped among fresh (holdout) ones."""
    train, holdout = digits_split
    copy_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:300]
    copies = train.images[copy_idx]
    batch = torch.cat([copies, noised(copies, sigma=4.0), holdout.images])
    k = len(copy_idx)

    detector = MemorisationDetector(feature_space=False)
    result = detector(batch, SafetyContext(train_images=train.images))

    copy_rate = rate(result.flagged[:k])
    noised_rate = rate(result.flagged[k : 2 * k])
    fresh_rate = rate(result.flagged[2 * k :])
    summary = f"copies {copy_rate:.1%}, noised copies {noised_rate:.1%}, fresh {fresh_rate:.1%}"
    print(summary)
    assert copy_rate == 1.0, summary
    assert noised_rate == 1.0, summary
    # calibrated for 0.5% of fresh images per criterion; 297 holdout digits
    assert fresh_rate <= 0.03, summary
    # the reason names the training image that was copied
    for i in range(0, k, 37):
        assert f"training image {int(copy_idx[i])}:" in str(result.reasons[i])
    assert isinstance(result.scores, dict) and isinstance(result.threshold, dict)
    assert set(result.scores) == set(result.threshold) == {"pixel_distance", "pixel_ratio"}
    assert bool((result.scores["pixel_distance"][:k] < 0.05).all())
    assert bool((result.scores["pixel_ratio"][:k] < 0.01).all())  # 0 up to cdist's rounding


def test_memorisation_in_feature_space_flags_copies_not_fresh_digits(
    digits16: tuple[ImageDataset, ImageDataset], judge16: TrainedClassifier
) -> None:
    train, holdout = digits16
    copies = train.images[torch.arange(0, len(train), 5)]
    batch = torch.cat([copies, noised(copies, sigma=4.0), holdout.images])
    k = len(copies)
    context = SafetyContext(train_images=train.images, features=judge16.features)

    result = MemorisationDetector()(batch, context)

    assert isinstance(result.scores, dict) and isinstance(result.threshold, dict)
    feature = result.scores["feature_ratio"] < result.threshold["feature_ratio"]
    rates = {
        "slipped-in training images": rate(result.flagged[:k]),
        "noised copies": rate(result.flagged[k : 2 * k]),
        "fresh": rate(result.flagged[2 * k :]),
        "fresh, feature criterion": rate(feature[2 * k :]),
        "copies, feature criterion": rate(feature[:k]),
    }
    print(rates)
    assert rates["slipped-in training images"] == 1.0
    assert rates["noised copies"] == 1.0
    assert rates["copies, feature criterion"] == 1.0  # a copy has feature distance 0 too
    assert rates["fresh"] <= 0.04
    assert rates["fresh, feature criterion"] <= 0.03


def test_ratio_thresholds_are_quantiles_of_the_training_sets_leave_one_out_ratios(
    digits16: tuple[ImageDataset, ImageDataset], judge16: TrainedClassifier
) -> None:
    """Oracle: brute-force distance matrices over every training image."""
    train, _ = digits16
    detector = MemorisationDetector(ratio_quantile=0.05, calibration_size=4096)
    calibration = detector.calibrate(train.images, judge16.features)

    def loo_ratio_quantile(rows: Tensor) -> float:
        d = torch.cdist(rows, rows)
        d.fill_diagonal_(float("inf"))
        two = d.topk(2, dim=1, largest=False).values
        return float(torch.quantile((two[:, 0] / two[:, 1]).double(), 0.05))

    pixels = train.images.flatten(1).float() / 255
    assert calibration.pixel_ratio_threshold == pytest.approx(loo_ratio_quantile(pixels), rel=1e-4)
    feats = judge16.features(train.images)
    assert calibration.feature_ratio_threshold == pytest.approx(loo_ratio_quantile(feats), rel=1e-4)


def test_memorisation_needs_the_feature_extractor_unless_pixels_only(
    digits16: tuple[ImageDataset, ImageDataset],
) -> None:
    train, holdout = digits16
    context = SafetyContext(train_images=train.images)
    with pytest.raises(SafetyError, match=r"context\.features"):
        MemorisationDetector()(holdout.images[:4], context)
    result = MemorisationDetector(feature_space=False)(holdout.images[:4], context)
    assert isinstance(result.scores, dict) and "feature_ratio" not in result.scores


def test_memorisation_threshold_is_a_fraction_of_the_median_gap_and_ignores_duplicates(
    digits16: tuple[ImageDataset, ImageDataset],
) -> None:
    train, _ = digits16
    detector = MemorisationDetector(
        relative_threshold=0.25, calibration_size=4096, feature_space=False
    )
    calibration = detector.calibrate(train.images)

    flat = train.images.flatten(1).float() / 255
    d = torch.cdist(flat, flat)
    d.fill_diagonal_(float("inf"))
    median = float(d.min(dim=1).values.median())
    assert calibration.median_nn_distance == pytest.approx(median, rel=1e-3)
    assert calibration.threshold == pytest.approx(0.25 * median, rel=1e-3)
    assert calibration.distinct_images == len(train)

    # every image twice: exact duplicates must not pull the median gap to 0
    doubled = torch.cat([train.images, train.images])
    again = MemorisationDetector(
        relative_threshold=0.25, calibration_size=4096, feature_space=False
    )
    assert again.calibrate(doubled).threshold == pytest.approx(calibration.threshold, rel=1e-3)


def test_memorisation_calibration_is_cached_per_training_tensor(
    digits16: tuple[ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    train, holdout = digits16
    images = train.images.clone()
    detector = MemorisationDetector(feature_space=False)
    calls = []
    original = torch.unique

    def counting_unique(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "unique", counting_unique)
    context = SafetyContext(train_images=images)
    first = detector(holdout.images[:10], context).threshold
    detector(holdout.images[:10], context)
    assert len(calls) == 1
    images[: len(images) // 2] = 0  # edited in place: calibrate again
    assert detector(holdout.images[:10], context).threshold != first
    assert len(calls) == 2


def test_explicit_threshold_overrides_calibration(
    digits16: tuple[ImageDataset, ImageDataset],
) -> None:
    train, holdout = digits16
    result = MemorisationDetector(threshold=10.0, pixel_ratio_threshold=0.01, feature_space=False)(
        holdout.images[:20], SafetyContext(train_images=train.images)
    )
    assert result.threshold == {"pixel_distance": 10.0, "pixel_ratio": 0.01}
    assert bool(result.flagged.all())


def test_memorisation_without_training_images_quarantines_the_batch(
    digits16: tuple[ImageDataset, ImageDataset],
) -> None:
    _, holdout = digits16
    decision = filter_images(holdout.images[:5], SafetyContext(), chain("memorisation"))
    assert not bool(decision.published.any())
    assert decision.records[0]["reasons"][0].startswith("detector memorisation failed:")
    assert "train_images" in decision.records[0]["reasons"][0]


# ----------------------------------------------------------------------------- sanity


def test_blank_saturated_and_constant_images_are_quarantined(
    digits16: tuple[ImageDataset, ImageDataset],
) -> None:
    train, holdout = digits16
    real = holdout.images[:20]
    shape = (1, *real.shape[1:])
    near_flat = noised(torch.full(shape, 128, dtype=torch.uint8), sigma=0.5)
    bad = torch.cat(
        [
            torch.zeros(shape, dtype=torch.uint8),
            torch.full(shape, 255, dtype=torch.uint8),
            torch.full(shape, 128, dtype=torch.uint8),
            near_flat,
        ]
    )
    batch = torch.cat([real, bad])
    gen = torch.Generator().manual_seed(0)
    binary = (torch.randint(0, 2, shape, generator=gen) * 255).to(torch.uint8)  # std ~127
    batch = torch.cat([real, bad, binary])
    decision = filter_images(batch, SafetyContext(train_images=train.images), chain("sanity"))

    assert decision.published.tolist() == [True] * 20 + [False] * 5
    reasons = [r["reasons"] for r in decision.records[20:]]
    assert reasons[0][0].startswith("sanity: blank: pixel std 0.0 < 2")
    assert reasons[1][0].startswith("sanity: saturated: pixel std")
    assert reasons[2][0].startswith("sanity: constant")
    assert reasons[4][0].startswith("sanity: saturated: 100.0% of values at 0 or 255")
    assert decision.records[20]["scores"]["sanity"] == 0.0
    assert decision.records[24]["scores"]["sanity"] > 100.0


def test_out_of_range_and_wrong_shape_images_are_quarantined() -> None:
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand((4, 1, 8, 8), generator=gen) * 2 - 1
    batch[2, 0, 1, 1] = 1.5  # a sampler that overshot [-1, 1]
    train = (torch.rand((50, 1, 8, 8), generator=gen) * 255).to(torch.uint8)
    decision = filter_images(batch, SafetyContext(train_images=train), chain("sanity"))
    assert decision.published.tolist() == [True, True, False, True]
    assert "out of range: 1 values outside [-1, 1]" in decision.records[2]["reasons"][0]

    wrong = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)  # RGB, training set is grey
    decision = filter_images(wrong, SafetyContext(train_images=train), chain("sanity"))
    assert not bool(decision.published.any())
    assert "wrong shape: images are (3, 8, 8), training images (1, 8, 8)" in str(
        decision.records[0]["reasons"]
    )


def test_non_finite_float_images_are_quarantined() -> None:
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand((6, 1, 8, 8), generator=gen) * 2 - 1  # model space [-1, 1]
    batch[1, 0, 3, 3] = float("nan")
    batch[3, 0, 0, 0] = float("inf")
    batch[4] = float("-inf")
    train = (torch.rand((50, 1, 8, 8), generator=gen) * 255).to(torch.uint8)
    context = SafetyContext(train_images=train)

    detectors = chain("sanity", "memorisation", memorisation={"feature_space": False})
    decision = filter_images(batch, context, detectors)

    assert decision.published.tolist() == [True, False, True, False, False, True]
    assert not decision.failures  # one bad image does not take the batch down
    assert "non-finite: 1 NaN/inf" in decision.records[1]["reasons"][0]
    assert decision.flagged["memorisation"].tolist() == [False, True, False, True, True, False]
    json.dumps(decision.records, allow_nan=False)


def test_wrong_dtype_or_shape_flags_every_image() -> None:
    context = SafetyContext()
    ints = torch.zeros((3, 1, 4, 4), dtype=torch.int32)
    flat = torch.zeros((3, 16), dtype=torch.uint8)
    for batch, words in [(ints, "dtype"), (flat, "shape")]:
        decision = filter_images(batch, context, [InvalidImageDetector()])
        assert not bool(decision.published.any())
        assert all(words in r["reasons"][0] for r in decision.records)


# ----------------------------------------------------------------------------- fail-closed


def test_a_detector_that_raises_quarantines_the_whole_batch(
    digits16: tuple[ImageDataset, ImageDataset],
) -> None:
    train, holdout = digits16
    images = holdout.images[:8]
    before = images.clone()
    broken = Fixed("broken", error=RuntimeError("out of cheese"))
    decision = filter_images(
        images, SafetyContext(train_images=train.images), [InvalidImageDetector(), broken]
    )

    assert not bool(decision.published.any())
    for record in decision.records:
        assert record["decision"] == "quarantine"
        assert "detector broken failed: RuntimeError: out of cheese" in record["reasons"]
        assert record["scores"]["broken"] is None
        assert record["scores"]["sanity"] > 2.0  # the detectors that ran are still on record
    assert decision.failures == {"broken": "RuntimeError: out of cheese"}
    assert decision.flag_rates()["broken"] == 1.0
    assert torch.equal(images, before)  # never substituted or blanked


@pytest.mark.parametrize(
    "result",
    [
        DetectorResult(torch.ones(7), torch.zeros(8, dtype=torch.bool), [None] * 8),
        DetectorResult(torch.ones(8), torch.zeros(7, dtype=torch.bool), [None] * 8),
        DetectorResult(torch.ones(8), torch.zeros(8, dtype=torch.bool), [None] * 7),
        DetectorResult(
            torch.full((8,), float("nan")), torch.zeros(8, dtype=torch.bool), [None] * 8
        ),
        DetectorResult(torch.ones(8), torch.zeros(8), [None] * 8),
        DetectorResult(
            torch.ones(8), torch.zeros(8, dtype=torch.bool), [None] * 8, threshold=float("nan")
        ),
        DetectorResult({"a": torch.ones(7)}, torch.zeros(8, dtype=torch.bool), [None] * 8),
        DetectorResult({}, torch.zeros(8, dtype=torch.bool), [None] * 8),
        DetectorResult(
            {"a": torch.ones(8)}, torch.zeros(8, dtype=torch.bool), [None] * 8, {"b": 1.0}
        ),
        "publish everything",
    ],
    ids=[
        "short-scores",
        "short-flags",
        "short-reasons",
        "nan-scores",
        "float-flags",
        "nan-threshold",
        "short-named-scores",
        "no-named-scores",
        "threshold-for-unknown-score",
        "str",
    ],
)
def test_malformed_detector_output_quarantines_the_whole_batch(result: object) -> None:
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    decision = filter_images(
        images, SafetyContext(), [InvalidImageDetector(), Fixed("odd", result)]
    )
    assert not bool(decision.published.any())
    assert all(r["reasons"][0].startswith("detector odd failed:") for r in decision.records)


def test_an_image_is_published_only_when_every_detector_passes_it() -> None:
    images = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    flags_a = torch.tensor([False, True, False, False])
    flags_b = torch.tensor([False, False, True, False])
    a = Fixed("a", DetectorResult(torch.zeros(4), flags_a, [None, "a says no", None, None]))
    b = Fixed("b", DetectorResult(torch.zeros(4), flags_b, [None, None, None, None]))
    decision = filter_images(images, SafetyContext(), [a, b, Fixed("c", passing(4))])
    assert decision.published.tolist() == [True, False, False, True]
    assert decision.records[1]["reasons"] == ["a: a says no"]
    assert decision.records[2]["reasons"] == ["b: flagged"]
    assert decision.records[2]["flagged_by"] == ["b"]


# ----------------------------------------------------------------------------- the chain


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (DetectorConfig(name="nsfw"), "unknown safety detector 'nsfw' (built in: sanity"),
        (DetectorConfig(name="memorisation", params={"treshold": 0.1}), "bad params"),
        (DetectorConfig(name="sanity", params={"min_std": -1.0}), "min_std"),
        (
            DetectorConfig(
                name="concept",
                params={
                    "model": "ViT-B-32",
                    "concepts": [{"name": "gore", "prompts": ["blood"], "threshold": 0.3}],
                },
            ),
            "no CLIP weights configured",
        ),
    ],
    ids=["unknown-name", "unknown-param", "bad-value", "missing-weights"],
)
def test_a_misconfigured_detector_quarantines_the_batch(spec: DetectorConfig, words: str) -> None:
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    detectors = [Fixed("ok", passing(5)), *build_chain(SafetyConfig(detectors=(spec,)))]
    decision = filter_images(images, SafetyContext(), detectors)
    assert not bool(decision.published.any())
    assert spec.name in decision.failures
    for record in decision.records:
        assert record["reasons"][0].startswith(f"detector {spec.name} failed: ")
        assert "misconfigured" in record["reasons"][0] and words in record["reasons"][0]


def test_chain_follows_config_order_params_and_enabled_flags() -> None:
    config = SafetyConfig(
        detectors=(
            DetectorConfig(name="memorisation", params={"relative_threshold": 0.1}),
            DetectorConfig(name="concept", enabled=False),  # not built, so no weights needed
            DetectorConfig(name="sanity", params={"min_std": 5.0}),
        )
    )
    memorisation, sanity = build_chain(config)
    assert isinstance(sanity, InvalidImageDetector) and sanity.min_std == 5.0
    assert isinstance(memorisation, MemorisationDetector)
    assert memorisation.relative_threshold == 0.1
    assert set(BUILT_IN) == {"sanity", "memorisation", "concept"}


def test_safety_config_rejects_repeats_and_an_empty_chain() -> None:
    from diffusion_core.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="sanity more than once"):
        parse_config({"safety": {"detectors": [{"name": "sanity"}, {"name": "sanity"}]}})
    with pytest.raises(ConfigError, match="at least one detector must be enabled"):
        parse_config({"safety": {"detectors": [{"name": "sanity", "enabled": False}]}})
    with pytest.raises(ConfigError, match=r"unknown key 'safety.detectors.0.threshold'"):
        parse_config({"safety": {"detectors": [{"name": "sanity", "threshold": 1}]}})


def test_no_detectors_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        filter_images(torch.zeros((1, 1, 4, 4), dtype=torch.uint8), SafetyContext(), [])
    with pytest.raises(SafetyError):
        filter_images(torch.tensor(1.0), SafetyContext(), [InvalidImageDetector()])
    with pytest.raises(ValueError, match="sample_ids"):
        filter_images(
            torch.zeros((2, 1, 4, 4), dtype=torch.uint8),
            SafetyContext(),
            [InvalidImageDetector()],
            sample_ids=[7],
        )


# ----------------------------------------------------------------------------- audit


def test_audit_records_and_flag_rates_add_up(
    digits16: tuple[ImageDataset, ImageDataset],
) -> None:
    train, holdout = digits16
    blank = torch.zeros((5, *train.images.shape[1:]), dtype=torch.uint8)
    batch = torch.cat([train.images[:10], holdout.images[:30], blank])
    n = len(batch)
    detectors = chain("sanity", "memorisation", memorisation={"feature_space": False})
    ids = list(range(100, 100 + n))
    decision = filter_images(
        batch, SafetyContext(train_images=train.images), detectors, sample_ids=ids
    )

    assert len(decision.records) == n
    json.dumps(decision.records, allow_nan=False)
    cal = MemorisationDetector(feature_space=False).calibrate(train.images)
    expected = {"pixel_distance": cal.threshold, "pixel_ratio": cal.pixel_ratio_threshold}
    for i, record in enumerate(decision.records):
        assert record["index"] == i and record["sample_id"] == 100 + i
        assert set(record["scores"]) == set(record["thresholds"]) == {"sanity", "memorisation"}
        assert record["thresholds"] == {"sanity": 2.0, "memorisation": pytest.approx(expected)}
        assert isinstance(record["scores"]["sanity"], float)
        assert set(record["scores"]["memorisation"]) == set(expected)
        published = bool(decision.published[i])
        assert record["decision"] == ("publish" if published else "quarantine")
        assert (record["reasons"] == []) == published

    counts = decision.counts()
    assert counts == {"images": n, "published": 30, "quarantined": 15}
    rates = decision.flag_rates()
    assert rates == {"sanity": pytest.approx(5 / n), "memorisation": pytest.approx(10 / n)}
    assert decision.flag_counts() == {"sanity": 5, "memorisation": 10}
    either = decision.flagged["sanity"] | decision.flagged["memorisation"]
    assert int(either.sum()) == counts["quarantined"]
    assert counts["published"] + counts["quarantined"] == n
    assert max(rates.values()) <= counts["quarantined"] / n <= sum(rates.values())


def test_configs_saved_with_pipeline_detectors_still_load() -> None:
    """Checkpoints and registered models carry the config of their day."""
    from diffusion_core.config import ConfigError, parse_config

    cfg = parse_config({"pipeline": {"num_samples": 10, "detectors": ["invalid", "memorisation"]}})
    assert [d.name for d in cfg.safety.detectors] == ["sanity", "memorisation"]
    assert cfg.pipeline.num_samples == 10 and "detectors" not in cfg.to_dict()["pipeline"]
    with pytest.raises(ConfigError, match=r"replaced by safety\.detectors"):
        parse_config({"pipeline": {"detectors": ["invalid"]}, "safety": {}})
