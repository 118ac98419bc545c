"""Safety detectors: throughput per detector on this CPU, and flag rates on quickstart samples.

Samples ``--num`` class-balanced digits from the trained quickstart checkpoint (DDIM 25 steps,
guidance 1.5, no retraining), trains the domain classifier (the pipeline's feature space) on the
training split, then measures
- images/s of each detector on the samples: sanity; memorisation in pixel space and in pixel +
  feature space (calibration timed apart, it runs once per training set); concept scoring with
  a ViT-B-32-sized and with the tiny random-weight CLIP (random weights: throughput only);
- flag rates of sanity and memorisation (per criterion) on the samples, and the memorisation
  detector's rates on ``--slipped`` training images slipped in among the samples vs the fresh
  samples and the real holdout digits.

    python bench/safety_detectors.py --checkpoint DIR [--config configs/quickstart.yaml]
        [--num 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffusion_core.config import SamplingDefaults, load_config
from diffusion_core.data import load_dataset, split_dataset
from diffusion_core.evaluation.judge import train_classifier
from diffusion_core.model import load_model
from diffusion_core.safety.concepts import ConceptDetector
from diffusion_core.safety.detector import DetectorResult, SafetyContext
from diffusion_core.safety.memorisation import MemorisationDetector
from diffusion_core.safety.sanity import InvalidImageDetector
from diffusion_core.sampling import SampleRequest, generate

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = [
    {"name": "weapon", "prompts": ["a photo of a gun", "a photo of a knife"], "threshold": 0.3},
    {"name": "gore", "prompts": ["a photo of blood", "a gory injury"], "threshold": 0.3},
]


def timed(fn: Callable[[], DetectorResult], repeats: int = 1) -> tuple[DetectorResult, float]:
    """The result of ``fn`` and its best wall time over ``repeats`` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    assert result is not None
    return result, best


def criterion_rates(result: DetectorResult, part: slice) -> dict[str, float]:
    """Fraction of ``part`` below each named threshold (memorisation: lower is worse)."""
    assert isinstance(result.scores, dict) and isinstance(result.threshold, dict)
    return {
        k: float((v[part] < result.threshold[k]).float().mean()) for k, v in result.scores.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a quickstart checkpoint folder (the checkpoint/ of a make run)",
    )
    p.add_argument(
        "--config",
        default=str(REPO / "configs" / "quickstart.yaml"),
        help="the run config the checkpoint was trained with (its data section)",
    )
    p.add_argument("--num", type=int, default=1000, help="samples to draw")
    p.add_argument("--slipped", type=int, default=300, help="training images slipped in")
    p.add_argument("--clip-images", type=int, default=128, help="images for ViT-B-32 timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, object] = {"threads": args.threads, "num_samples": args.num}

    # Samples from the trained quickstart model (DDIM 25, guidance 1.5).
    net, card = load_model(args.checkpoint)
    data_cfg = load_config(args.config).data
    train, holdout = split_dataset(
        load_dataset(data_cfg), holdout_fraction=data_cfg.holdout_fraction, seed=data_cfg.split_seed
    )
    if train.sha256() != card.dataset_sha256:
        raise SystemExit(
            f"{args.checkpoint} was not trained on the training split of {args.config}'s data "
            "section; pass the --config it was trained with"
        )
    # Every knob fixed here (not the card's), as before; class-balanced labels (0, 1, ..., K-1,
    # 0, ...) are generate's default for a class model.
    knobs = SamplingDefaults(sampler="ddim", steps=25, guidance_scale=1.5)
    request = SampleRequest(**knobs.model_dump(), batch_size=250, num_samples=args.num)
    t0 = time.perf_counter()
    samples = generate(net, card, request).images
    out["sampling_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    judge = train_classifier(train, holdout)
    out["classifier_seconds"] = time.perf_counter() - t0
    context = SafetyContext(train_images=train.images, features=judge.features)
    n = len(samples)

    # Throughput.
    speed: dict[str, float] = {}
    sanity, s = timed(lambda: InvalidImageDetector()(samples, context), repeats=3)
    speed["sanity"] = n / s
    pixel = MemorisationDetector(feature_space=False)
    t0 = time.perf_counter()
    pixel.calibrate(train.images)
    out["calibration_seconds_pixel"] = time.perf_counter() - t0
    _, s = timed(lambda: pixel(samples, context), repeats=3)
    speed["memorisation (pixel)"] = n / s
    both = MemorisationDetector()
    t0 = time.perf_counter()
    calibration = both.calibrate(train.images, judge.features)
    out["calibration_seconds_pixel_feature"] = time.perf_counter() - t0
    out["calibration"] = vars(calibration)
    memorisation, s = timed(lambda: both(samples, context), repeats=3)
    speed["memorisation (pixel + feature)"] = n / s
    for label, model, count in (
        ("concept (tiny CLIP)", str(REPO / "configs" / "clip" / "tiny-clip.json"), n),
        ("concept (ViT-B-32, random weights)", "ViT-B-32", args.clip_images),
    ):
        detector = ConceptDetector(model=model, concepts=CONCEPTS, random_weights=True)
        _, s = timed(lambda d=detector, c=count: d(samples[:c], context))  # type: ignore[misc]
        speed[label] = count / s
    out["images_per_second"] = speed

    # Flag rates on the samples, then with training images slipped in.
    out["flag_rates_samples"] = {
        "sanity": float(sanity.flagged.float().mean()),
        "memorisation": float(memorisation.flagged.float().mean()),
        **{f"memorisation/{k}": v for k, v in criterion_rates(memorisation, slice(0, n)).items()},
    }
    gen = torch.Generator().manual_seed(0)
    slipped_idx = torch.randperm(len(train), generator=gen)[: args.slipped]
    batch = torch.cat([samples, train.images[slipped_idx], holdout.images])
    mixed = both(batch, context)
    parts = {
        "fresh samples": slice(0, n),
        "slipped-in training images": slice(n, n + args.slipped),
        "real holdout digits": slice(n + args.slipped, len(batch)),
    }
    out["memorisation_rates"] = {
        name: {"flagged": float(mixed.flagged[part].float().mean()), **criterion_rates(mixed, part)}
        for name, part in parts.items()
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
