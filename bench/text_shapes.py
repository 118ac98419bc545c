"""Text-to-image on the captioned shapes: prompt adherence and fidelity per guidance scale.

Trains ``configs/shapes_text.yaml`` (resuming in ``--out`` when a run is there) on every
shape-colour-position combination except a held-out few, then, at each guidance scale and with
the model's sampler (or ``--sampler/--steps/--spacing``):

- samples one image per holdout caption (the 600 holdout images' own prompts, so the generated set
  asks for what the reference shows; a few of them are held-out combinations) and scores it
  against the holdout images: FID with its half-sample interval, and FID, precision and recall at
  equal counts against the real-vs-real floor (two holdout halves, ``--draws`` random splits), on
  the features of a judge trained on the training images to tell all 135 (shape, colour,
  position) combinations apart (the pipeline's own judge knows only the 3 shapes);
- prompt adherence of those samples by the analytic detector, on seen and held-out prompts
  apart, plus ``--unseen-repeats`` more images per held-out prompt; held-out prompts were never
  seen together in training, so accuracy there needs composition, not recall; and the number of
  distinct detected triples among the seen-prompt samples shows whether guidance collapses them.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/text_shapes.py --out /tmp/shapes-text
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from diffusion_core.config import load_config
from diffusion_core.data import ImageDataset, load_dataset, split_dataset
from diffusion_core.data.shapes import SHAPE_COLOURS, SHAPE_NAMES, SHAPE_POSITIONS, shape_caption
from diffusion_core.evaluation import fidelity, quality
from diffusion_core.evaluation.judge import load_classifier, save_classifier, train_classifier
from diffusion_core.evaluation.shapes import adherence, detect, parse_caption
from diffusion_core.io import sha256_file
from diffusion_core.model import load_model
from diffusion_core.sampling import SampleRequest, generate
from diffusion_core.training import train

COMBOS = [(s, c, p) for s in SHAPE_NAMES for c in SHAPE_COLOURS for p in SHAPE_POSITIONS]


def held_out_prompts(every: int) -> list[str]:
    """Every ``every``-th combination in (shape, colour, position) order: never trained on."""
    return [shape_caption(s, p, c) for i, (s, c, p) in enumerate(COMBOS) if i % every == 0]


def by_combination(data: ImageDataset) -> ImageDataset:
    """The same images labelled by their (shape, colour, position) combination (135 classes)."""
    assert data.captions is not None
    index = {shape_caption(s, p, c): i for i, (s, c, p) in enumerate(COMBOS)}
    labels = torch.tensor([index[c] for c in data.captions], dtype=torch.long)
    names = [shape_caption(s, p, c) for s, c, p in COMBOS]
    return dataclasses.replace(data, labels=labels, class_names=names)


def fidelity_judge(train_set: ImageDataset, holdout: ImageDataset, where: Path) -> Any:
    """The combination classifier (trained once into ``where``) as a torch-fidelity extractor."""
    if not (where / "meta.json").is_file():
        save_classifier(train_classifier(by_combination(train_set), by_combination(holdout)), where)
    judge = load_classifier(where)
    extractor = fidelity.Extractor(
        fidelity.DOMAIN, where, sha256_file(where / "weights.safetensors")
    )
    return judge, extractor


def main() -> None:
    # Long function: a benchmark script read top to bottom (train, judge, one row per scale).
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes_text.yaml")
    parser.add_argument("--out", required=True, help="training run directory (resumed)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--scales", default="1,2,3", help="guidance scales")
    parser.add_argument("--sampler", help="default: the model's")
    parser.add_argument("--sample-steps", type=int, help="default: the model's")
    parser.add_argument("--spacing", help="default: the model's")
    parser.add_argument("--hold-out-every", type=int, default=16)
    parser.add_argument("--unseen-repeats", type=int, default=4)
    parser.add_argument("--draws", type=int, default=50, help="equal-count splits per scale")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    overrides = {"train.steps": args.steps} if args.steps else {}
    cfg = load_config(args.config, overrides)
    dataset = load_dataset(cfg.data)
    full_train, holdout = split_dataset(
        dataset, holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    unseen = held_out_prompts(args.hold_out_every)
    assert full_train.captions is not None and holdout.captions is not None
    keep = [i for i, c in enumerate(full_train.captions) if c not in set(unseen)]
    train_set = full_train.subset(keep)
    seen = sorted(set(train_set.captions or []))

    t0 = time.perf_counter()
    result = train(cfg, train_set, args.out, progress=False)
    train_seconds = time.perf_counter() - t0
    net, card = load_model(result.checkpoint)
    print(
        f"trained {result.steps} steps in {train_seconds:.0f} s on {len(train_set)} images "
        f"({len(seen)} prompts; {len(unseen)} held out)"
    )
    judge, extractor = fidelity_judge(full_train, holdout, Path(args.out) / "judge")
    reference = judge.features(holdout.images)
    print(
        f"fidelity judge: accuracy on the holdout's 135 combinations {judge.holdout_accuracy:.3f}"
    )

    knobs = {"sampler": args.sampler, "steps": args.sample_steps, "spacing": args.spacing}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    ref_prompts = tuple(holdout.captions)
    is_unseen = torch.tensor([c in set(unseen) for c in ref_prompts])
    extra = tuple(unseen * args.unseen_repeats)
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        t1 = time.perf_counter()
        request = SampleRequest(
            **knobs, guidance_scale=scale, num_samples=len(ref_prompts), prompts=ref_prompts
        )
        samples = generate(net, card, request)
        more = generate(
            net,
            card,
            request.model_copy(update={"num_samples": len(extra), "prompts": extra, "seed": 1}),
        )
        seconds = time.perf_counter() - t1
        images = samples.images
        m = quality.score(images, holdout.images, extractor)
        m |= fidelity.floor_draws(judge.features(images), reference, draws=args.draws)
        seen_idx = (~is_unseen).nonzero().flatten()
        on_seen = adherence(images[seen_idx], [ref_prompts[i] for i in seen_idx])
        unseen_images = torch.cat([images[is_unseen], more.images])
        unseen_prompts = [p for p, u in zip(ref_prompts, is_unseen, strict=True) if u] + list(extra)
        on_unseen = adherence(unseen_images, unseen_prompts)
        found = {f for f in detect(images[seen_idx]) if f is not None}
        row = {
            "guidance": scale,
            "sampler": samples.knobs.sampler,
            "sample_steps": samples.knobs.steps,
            "spacing": samples.knobs.spacing,
            "nfe": samples.nfe,
            "seen": on_seen,
            "unseen": on_unseen,
            "num_seen": len(seen_idx),
            "num_unseen": len(unseen_prompts),
            "distinct_triples": len(found),
            "sample_seconds": round(seconds, 1),
            **m,
        }
        rows.append(row)
        print(
            f"guidance {scale:g}: seen shape {on_seen['shape']:.3f} colour {on_seen['colour']:.3f} "
            f"position {on_seen['position']:.3f} all {on_seen['all']:.3f} | held-out all "
            f"{on_unseen['all']:.3f} (n={len(unseen_prompts)}) | FID {m['fid']:.2f} "
            f"[{m['fid_low']:.2f}, {m['fid_high']:.2f}], at n={m['h']:.0f} {m['fid_h']:.2f} vs "
            f"floor {m['fid_floor_h']:.2f} ({m['fid_h'] / m['fid_floor_h']:.2f}x) | precision "
            f"{m['precision_h']:.3f} recall {m['recall_h']:.3f} (floor {m['precision_floor_h']:.3f}"
            f" / {m['recall_floor_h']:.3f}) | distinct {len(found)} | {seconds:.0f} s",
            flush=True,
        )
    assert all(parse_caption(p) for p in ref_prompts)
    summary = {
        "config": args.config,
        "steps": cfg.train.steps,
        "train_seconds": round(train_seconds, 1),
        "fidelity_judge_accuracy": judge.holdout_accuracy,
        "held_out": unseen,
        "rows": rows,
    }
    name = f"text_shapes{'-' + '-'.join(map(str, knobs.values())) if knobs else ''}.json"
    (Path(args.out) / name).write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
