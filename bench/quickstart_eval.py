"""The quickstart model judged as the pipeline judges it: torch-fidelity on the domain classifier.

Loads a trained quickstart checkpoint (no training), trains the dataset's domain classifier as the
pipeline does (``train_classifier`` defaults), and prints

- at the checkpoint's sampling setting: FID against the 297 holdout digits with its half-sample
  interval, the real-vs-real floor (two disjoint holdout halves) beside the generated half at the
  same count and their ratio, KID, precision/recall, and conditional accuracy beside the judge's
  own holdout accuracy;
- with ``--sweep``: per sampler setting (same seeds for every setting) FID, measured NFE and wall
  time, and the sharper test of whether it matches the reference (DDPM with the most steps): the
  paired FID gap to the reference with its interval, against ``--sweep-reference`` (``train``:
  the 1,500 training digits, a separate record from the holdout one: they were seen in training,
  so the gap compares samplers of one model, not generalisation), and for each sampler the fewest
  NFE whose gap's interval reaches 0 (not worse than the reference at 95%).

    python bench/quickstart_eval.py --checkpoint DIR [--num 1000]
        [--sweep [SAMPLER:STEPS[:SPACING] ...]] [--sweep-num 500]
        [--sweep-reference train|holdout] [--judge DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from diffusion_core.config import SweepSetting, load_config
from diffusion_core.data import load_dataset, split_dataset
from diffusion_core.evaluation import fidelity, quality
from diffusion_core.evaluation.judge import load_classifier, save_classifier, train_classifier
from diffusion_core.evaluation.sweep import fewest_nfe_match, paired_matches, run_sweep
from diffusion_core.io import sha256_file
from diffusion_core.model import load_model
from diffusion_core.sampling import SampleRequest, generate

REPO = Path(__file__).resolve().parents[1]
FULL_SWEEP = [
    "ddpm:1000",
    *(f"ddim:{n}" for n in (5, 10, 20, 50)),
    *(f"dpmpp_2m:{n}" for n in (5, 10, 20)),
    *(f"dpmpp_2m:{n}:karras" for n in (5, 10, 20)),
    *(f"unipc:{n}:karras" for n in (5, 10, 20)),
    *(f"euler:{n}:karras" for n in (10, 20, 50)),
    *(f"heun:{n}:karras" for n in (3, 5, 10, 20)),
    *(f"euler_ancestral:{n}" for n in (20, 50, 100)),
]


def setting(text: str) -> SweepSetting:
    sampler, steps, *spacing = text.split(":")
    if not steps.isdigit():
        raise SystemExit(f"--sweep {text!r}: steps must be a whole number, got {steps!r}")
    fields: dict[str, object] = {"sampler": sampler, "steps": int(steps)}
    if spacing:
        fields["spacing"] = spacing[0]
    return SweepSetting.model_validate(fields)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--checkpoint", required=True, help="a trained quickstart checkpoint dir")
    p.add_argument("--num", type=int, default=1000, help="samples at the quickstart setting")
    p.add_argument(
        "--sweep", nargs="*", metavar="SAMPLER:STEPS[:SPACING]", help=f"default: {FULL_SWEEP}"
    )
    p.add_argument("--sweep-num", type=int, default=500, help="samples per sweep setting")
    p.add_argument("--sweep-reference", choices=("train", "holdout"), default="train")
    p.add_argument("--draws", type=int, default=100, help="half-sample draws per interval")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model card's)")
    p.add_argument("--judge", help="classifier dir: reused when it exists, else trained into it")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    cfg = load_config(args.config)
    train_set, holdout = split_dataset(
        load_dataset(cfg.data), holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    judge_dir = Path(args.judge or tempfile.mkdtemp(prefix="judge-"))
    t0 = time.perf_counter()
    if (judge_dir / "meta.json").is_file():
        judge = load_classifier(judge_dir)
    else:
        judge = train_classifier(train_set, holdout)
        save_classifier(judge, judge_dir)
    print(
        f"judge: holdout accuracy {judge.holdout_accuracy:.4f} ({time.perf_counter() - t0:.0f} s)"
    )
    extractor = fidelity.Extractor(
        fidelity.DOMAIN, judge_dir, sha256_file(judge_dir / "weights.safetensors")
    )
    score = partial(quality.score, reference=holdout.images, extractor=extractor, draws=args.draws)
    net, card = load_model(args.checkpoint)
    out: dict[str, Any] = {"judge_holdout_accuracy": judge.holdout_accuracy}

    # The quickstart setting: the model card's sampling defaults (--num 0 skips it).
    if args.num:
        t0 = time.perf_counter()
        samples = generate(
            net, card, SampleRequest(num_samples=args.num, guidance_scale=args.guidance)
        )
        seconds = time.perf_counter() - t0
        sc = samples.knobs
        m = score(samples.images)
        assert samples.labels is not None
        accuracy = judge.accuracy(samples.images, samples.labels)
        m |= {"conditional_accuracy": accuracy, "accuracy_gap": judge.holdout_accuracy - accuracy}
        out["main"] = {
            "sampler": sc.sampler,
            "steps": sc.steps,
            "guidance_scale": sc.guidance_scale,
            "num_samples": args.num,
            "sample_seconds": seconds,
            **m,
        }
        print(
            f"{sc.sampler} {sc.steps} steps, guidance {sc.guidance_scale}, {args.num} samples "
            f"({seconds:.0f} s) vs {len(holdout)} holdout digits:\n"
            f"  FID {m['fid']:.3f} [{m['fid_low']:.3f}, {m['fid_high']:.3f}]\n"
            f"  FID at n={m['num_half']:.0f}: generated {m['fid_half']:.3f}, floor (holdout "
            f"half vs half) {m['fid_floor_half']:.3f}, ratio {m['fid_half_over_floor']:.2f}\n"
            f"  KID {m['kid']:.4f} [{m['kid_low']:.4f}, {m['kid_high']:.4f}], floor "
            f"{m['kid_floor_half']:.4f}\n"
            f"  precision {m['precision']:.3f} recall {m['recall']:.3f} (floor "
            f"{m['precision_floor_half']:.3f} / {m['recall_floor_half']:.3f}), "
            f"IS {m['inception_score']:.3f}\n"
            f"  conditional accuracy {accuracy:.4f} vs judge on real {judge.holdout_accuracy:.4f} "
            f"(gap {m['accuracy_gap']:+.4f}, goal <= 0.01)",
            flush=True,
        )

    # The sweep.
    if args.sweep is not None:
        settings = tuple(setting(s) for s in (args.sweep or FULL_SWEEP))
        reference = train_set if args.sweep_reference == "train" else holdout
        score_ref = partial(
            quality.score, reference=reference.images, extractor=extractor, draws=args.draws
        )
        ref_feats = judge.features(reference.images)
        rows, feats = [], []

        def keep_features(images: Any) -> dict[str, float]:
            feats.append(judge.features(images))
            return score_ref(images)

        for s in settings:  # one at a time, so that progress shows
            base = SampleRequest(num_samples=args.sweep_num, guidance_scale=args.guidance)
            rows += run_sweep(net, card, base, (s,), score=keep_features)
            r = rows[-1]
            print(
                f"  {r['sampler']:>15} {r['steps']:>4} {r['spacing']:>8}: NFE {r['nfe']:g}, "
                f"{r['wall_seconds']:.1f} s, FID {r['fid']:.3f} [{r['fid_low']:.3f}, "
                f"{r['fid_high']:.3f}], precision {r['precision']:.3f}, recall {r['recall']:.3f}",
                flush=True,
            )
        rule = fewest_nfe_match(rows)  # the unpaired rule, for comparison
        best = paired_matches(rows, feats, ref_feats, draws=args.draws)
        rows, first = best["rows"], best["first_match_nfe"]
        out["sweep"] = {
            "num_samples": args.sweep_num,
            "reference_set": f"{args.sweep_reference} ({len(reference)} digits)",
            **best,
            "unpaired_rule": rule["note"],
        }
        print(f"unpaired rule: {rule['note']}")
        print(best["note"])
        print(f"paired gap to {best['reference']['sampler']}-{best['reference']['steps']}:")
        for r in rows:
            print(
                f"  {r['sampler']:>15} {r['steps']:>4} {r['spacing']:>8}: NFE {r['nfe']:>5g} gap "
                f"{r['gap']:+.3f} [{r['gap_low']:+.3f}, {r['gap_high']:+.3f}]"
                f"{'  matches' if r['matches'] else ''}"
            )
        print(f"fewest NFE that match, per sampler: {first}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
