"""Inpainting quality of a checkpoint: RePaint against plain replacement on the holdout split.

Runs the pipeline's inpainting evaluation (``diffusion_core.evaluation.inpainting``) on the
first ``--num-images`` holdout images of the checkpoint's own dataset and split (from ``--config``,
checked against the dataset sha256 on the checkpoint's model card), with the three standard masks
(centre box, seeded strokes, right half), and prints masked-region MSE / PSNR on [0, 1], the seam
score beside the real images' and the cost of each method. The known region is checked to be
unchanged in every completion (the run fails otherwise).

    python bench/inpaint_quality.py --checkpoint DIR [--config configs/quickstart.yaml]
        [--num-images 32] [--resample 10] [--jump-length 10] [--steps 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusion_core.config import InpaintEvalConfig, load_config
from diffusion_core.data import load_dataset, split_dataset
from diffusion_core.evaluation.inpainting import evaluate_inpainting
from diffusion_core.model import load_model
from diffusion_core.sampling import SampleRequest

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument(
        "--config",
        default=str(REPO / "configs" / "quickstart.yaml"),
        help="the run config the checkpoint was trained with (its data section and name)",
    )
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--resample", type=int, default=10, help="RePaint's r (replacement is r = 1)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint's j")
    p.add_argument("--steps", type=int, help="grid steps (default: the model card's steps)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    net, card = load_model(args.checkpoint)
    cfg = load_config(args.config)
    request = SampleRequest(steps=args.steps)  # None: the card's default steps
    steps = request.knobs(card).steps
    train_set, holdout = split_dataset(
        load_dataset(cfg.data), holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    if train_set.sha256() != card.dataset_sha256:
        raise SystemExit(
            f"{args.checkpoint} was not trained on the training split of {args.config}'s data "
            "section; pass the --config it was trained with"
        )
    evaluation = InpaintEvalConfig(
        enabled=True,
        num_images=args.num_images,
        jump_length=args.jump_length,
        resample=args.resample,
    )
    t0 = time.perf_counter()
    rows = evaluate_inpainting(net, card, request, holdout.images, evaluation).rows
    total = time.perf_counter() - t0
    print(
        f"{cfg.name}: {rows[0]['num_images']} holdout images, {steps}-step grid, "
        f"RePaint j={args.jump_length} r={args.resample}, {torch.get_num_threads()} thread(s)"
    )
    header = ("mask", "method", "nfe", "mse", "psnr_db", "seam", "seam_real", "seam_ratio", "s")
    print(" ".join(f"{h:>11}" for h in header))
    for r in rows:
        print(
            f"{r['mask']:>11} {r['method']:>11} {r['nfe']:>11d} {r['mse']:>11.4f} "
            f"{r['psnr']:>11.2f} {r['seam']:>11.4f} {r['seam_real']:>11.4f} "
            f"{r['seam_ratio']:>11.3f} {r['seconds']:>11.1f}"
        )
    print(f"known region unchanged in every completion; total {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": total}, f, indent=2)


if __name__ == "__main__":
    main()
