"""Text-to-image prompt adherence on the captioned shapes, with and without guidance.

Trains ``configs/shapes_text.yaml`` (resuming in ``--out`` when a run is there) on every
shape-colour-position combination except a held-out few, then samples one image per seen prompt
and ``--unseen-repeats`` per held-out prompt at each guidance scale (fixed DDIM sampler) and
prints the analytic detector's shape / colour / position accuracy. The held-out prompts were never
seen together in training: accuracy there checks that guidance composes attributes rather than
recalling memorised images, and the count of distinct detected (shape, colour, position) triples
shows whether guidance collapses samples onto fewer outcomes.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/text_shapes.py --out /tmp/shapes-text
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from diffusion_core.config import load_config
from diffusion_core.data import load_dataset, split_dataset
from diffusion_core.data.shapes import SHAPE_COLOURS, SHAPE_NAMES, SHAPE_POSITIONS, shape_caption
from diffusion_core.evaluation.shapes import adherence, detect, parse_caption
from diffusion_core.model import load_model
from diffusion_core.sampling import SampleRequest, generate
from diffusion_core.training import train


def held_out_prompts(every: int) -> list[str]:
    """Every ``every``-th combination in (shape, colour, position) order: never trained on."""
    combos = [(s, c, p) for s in SHAPE_NAMES for c in SHAPE_COLOURS for p in SHAPE_POSITIONS]
    return [shape_caption(s, p, c) for i, (s, c, p) in enumerate(combos) if i % every == 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes_text.yaml")
    parser.add_argument("--out", required=True, help="training run directory (resumed)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--scales", default="1,2,3", help="guidance scales")
    parser.add_argument("--hold-out-every", type=int, default=16)
    parser.add_argument("--unseen-repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    overrides = {"train.steps": args.steps} if args.steps else {}
    cfg = load_config(args.config, overrides)
    dataset = load_dataset(cfg.data)
    train_set, _ = split_dataset(
        dataset, holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    unseen = held_out_prompts(args.hold_out_every)
    assert train_set.captions is not None
    keep = [i for i, c in enumerate(train_set.captions) if c not in set(unseen)]
    train_set = train_set.subset(keep)
    seen = sorted(set(train_set.captions or []))

    t0 = time.perf_counter()
    result = train(cfg, train_set, args.out, progress=False)
    train_seconds = time.perf_counter() - t0
    net, card = load_model(result.checkpoint)
    print(
        f"trained {result.steps} steps in {train_seconds:.0f} s on {len(train_set)} images "
        f"({len(seen)} prompts; {len(unseen)} held out)"
    )

    rows = []
    prompts = seen + unseen * args.unseen_repeats
    for scale in [float(s) for s in args.scales.split(",")]:
        request = SampleRequest(
            guidance_scale=scale, num_samples=len(prompts), prompts=tuple(prompts)
        )
        t1 = time.perf_counter()
        samples = generate(net, card, request)
        seconds = time.perf_counter() - t1
        images = samples.images
        on_seen = adherence(images[: len(seen)], seen)
        on_unseen = adherence(images[len(seen) :], prompts[len(seen) :])
        found = {f for f in detect(images[: len(seen)]) if f is not None}
        row = {
            "guidance": scale,
            "seen": on_seen,
            "unseen": on_unseen,
            "distinct_triples": len(found),
            "distinct_prompts": len(seen),
            "sample_seconds": round(seconds, 1),
        }
        rows.append(row)
        print(
            f"guidance {scale:g}: seen shape {on_seen['shape']:.3f} colour {on_seen['colour']:.3f} "
            f"position {on_seen['position']:.3f} all {on_seen['all']:.3f} | held-out shape "
            f"{on_unseen['shape']:.3f} colour {on_unseen['colour']:.3f} position "
            f"{on_unseen['position']:.3f} all {on_unseen['all']:.3f} | distinct triples "
            f"{len(found)}/{len(seen)} | {seconds:.0f} s",
            flush=True,
        )
    assert all(parse_caption(p) for p in prompts)
    summary = {
        "config": args.config,
        "steps": cfg.train.steps,
        "train_seconds": round(train_seconds, 1),
        "sampler": f"{card.sampling.sampler} {card.sampling.steps} steps",
        "held_out": unseen,
        "rows": rows,
    }
    (Path(args.out) / "text_shapes.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
