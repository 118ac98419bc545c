"""Sample quality of the quickstart model: conditional accuracy and FID against a digit judge.

Trains the quickstart config (or loads a checkpoint), samples class-balanced digits with
classifier-free guidance and judges them with a small CNN trained independently on the real
training digits. Prints the judge's own holdout accuracy, the samples' conditional accuracy, and
the Frechet distance on the judge's 64-d features (297 samples vs the 297 holdout digits) beside
the real-vs-real floor (297 training digits vs the holdout, five draws), so that accuracy is never
bought with diversity.

    python bench/quickstart_quality.py [--checkpoint DIR] [--guidance 1.5 2.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffusion_core.config import load_config
from diffusion_core.data import load_dataset, split_dataset
from diffusion_core.evaluation import fidelity
from diffusion_core.evaluation.judge import train_classifier
from diffusion_core.model import load_model
from diffusion_core.sampling import SampleRequest, generate
from diffusion_core.training import train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--checkpoint", help="skip training and judge this checkpoint")
    p.add_argument("--out", help="training output directory (default: a temporary one)")
    p.add_argument("--num", type=int, default=1000, help="samples to judge")
    p.add_argument(
        "--guidance", type=float, nargs="+", help="guidance scales (default: the model card's)"
    )
    p.add_argument("--sampler", help="default: the model card's")
    p.add_argument("--steps", type=int, help="default: the model card's")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    cfg = load_config(args.config)
    data = load_dataset(cfg.data)
    train_set, holdout = split_dataset(
        data, holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    assert holdout.labels is not None

    t0 = time.perf_counter()
    judge = train_classifier(train_set, holdout, seed=123)
    print(
        f"judge: holdout accuracy {judge.holdout_accuracy:.4f} ({time.perf_counter() - t0:.0f} s)"
    )

    train_seconds = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        out = Path(args.out or tempfile.mkdtemp(prefix="quickstart-"))
        t0 = time.perf_counter()
        result = train(cfg, train_set, out)
        train_seconds = time.perf_counter() - t0
        ckpt = result.checkpoint
        print(f"trained {result.steps} steps in {train_seconds:.0f} s -> {ckpt}")
    net, card = load_model(ckpt)

    # The floor: 297 real training digits vs the holdout, five draws.
    n_ref = len(holdout)
    real_feats = judge.features(holdout.images)
    train_feats = judge.features(train_set.images)
    floors = []
    for draw in range(5):
        idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(draw))[:n_ref]
        floors.append(fidelity.fid(train_feats[idx], real_feats))
    floor = torch.tensor(floors)
    print(f"FID floor (real vs real, n={n_ref}): {floor.mean():.2f} +- {floor.std():.2f}")

    rows = []
    updates = {k: v for k, v in {"sampler": args.sampler, "steps": args.steps}.items() if v}
    for scale in args.guidance or [card.sampling.guidance_scale]:
        # Class-balanced labels (0, 1, ..., K-1, 0, ...): generate's default for a class model.
        request = SampleRequest(**updates, guidance_scale=scale, num_samples=args.num)
        t0 = time.perf_counter()
        samples = generate(net, card, request)
        sample_seconds = time.perf_counter() - t0
        sc, labels = samples.knobs, samples.labels
        assert labels is not None, "the quickstart model is class-conditional"
        accuracy = judge.accuracy(samples.images, labels)
        fid = fidelity.fid(judge.features(samples.images[:n_ref]), real_feats)
        row = {
            "sampler": sc.sampler,
            "steps": sc.steps,
            "guidance": scale,
            "conditional_accuracy": accuracy,
            "judge_holdout_accuracy": judge.holdout_accuracy,
            "accuracy_gap": judge.holdout_accuracy - accuracy,
            "fid": fid,
            "fid_floor_mean": float(floor.mean()),
            "fid_over_floor": fid / float(floor.mean()),
            "samples_per_second": args.num / sample_seconds,
        }
        rows.append(row)
        print(
            f"{sc.sampler} {sc.steps} steps, guidance {scale}: conditional accuracy {accuracy:.4f} "
            f"(judge on real {judge.holdout_accuracy:.4f}, gap {row['accuracy_gap']:+.4f}), "
            f"FID {fid:.2f} = {row['fid_over_floor']:.2f} x floor, "
            f"{row['samples_per_second']:.0f} samples/s"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"train_seconds": train_seconds, "rows": rows, "floors": floors}, indent=2)
        )


if __name__ == "__main__":
    main()
