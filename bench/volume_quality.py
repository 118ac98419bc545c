"""Sample quality of the volume model: MMD against the holdout-vs-holdout floor, occupancy.

Runs the pipeline's stages (the same library functions the Prefect tasks call, without Prefect
or MLflow) on a local artefact store: prepare the dataset, train ``configs/volume3d.yaml``,
sample class-balanced volumes, safety-filter them (detectors on maximum-intensity projections),
evaluate and write the report. Prints the wall time of each stage and the figures:

* MMD: unbiased squared MMD with KID's cubic polynomial kernel on the 64-d features of a small
  3-D CNN trained on the training split; ``mmd_half`` (as many generated volumes as one holdout
  half, against that half) beside ``mmd_floor_half`` (the two disjoint holdout halves).
* FID on the same features, likewise with its half-vs-half floor.
* Occupancy (fraction of voxels above 0.5): mean generated vs holdout, and the 1-D Wasserstein
  distance between the two distributions beside its floor.
* Per class: occupancy, fill ratio (occupied / bounding-box voxels) and the judge's accuracy.

    python bench/volume_quality.py [--config configs/volume3d.yaml] [--out DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from diffusion_core import stages
from diffusion_core.config import load_config
from diffusion_core.storage import ArtefactStore

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "volume3d.yaml"))
    p.add_argument("--out", help="artefact root and work directory (default: a temporary one)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    cfg = load_config(args.config)
    out = Path(args.out or tempfile.mkdtemp(prefix="volume3d-"))
    store = ArtefactStore(f"file://{out / 'artefacts'}")
    seconds: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)

    t0 = time.perf_counter()
    dataset = stages.prepare_dataset(cfg.data, store)
    timed("prepare", t0)
    t0 = time.perf_counter()
    ckpt = stages.train_model(cfg, dataset, store, run_prefix="runs/bench", work_dir=out / "work")
    timed("train", t0)
    pc = cfg.pipeline
    shard_size = -(-pc.num_samples // pc.shards)
    t0 = time.perf_counter()
    shards = [
        stages.sample_shard(
            store, ckpt.prefix, cfg.sample, out_prefix="runs/bench/samples", shard=i,
            shard_size=shard_size, total=pc.num_samples,
        ).prefix
        for i in range(pc.shards)
    ]  # fmt: skip
    timed("sample", t0)
    t0 = time.perf_counter()
    safety = stages.safety_filter(
        store, shards, dataset, out_prefix="runs/bench/safety", safety=cfg.safety
    )
    timed("safety", t0)
    t0 = time.perf_counter()
    evaluation = stages.evaluate_samples(
        store, safety.prefix, dataset, sample=cfg.sample, out_key="runs/bench/metrics.json"
    )
    timed("evaluate (incl. training the 3-D judge)", t0)
    report = stages.make_report(
        store,
        stages.ReportInputs(
            run_prefix="runs/bench", run_id="bench", model_name=cfg.name, model_version="0",
            config=cfg.to_dict(), dataset=dataset, safety=safety, metrics=evaluation.metrics,
            history=ckpt.history,
        ),
    )  # fmt: skip

    m = evaluation.metrics
    print(
        f"\ntrained {ckpt.steps} steps (batch {cfg.train.batch_size}) in {seconds['train']:.0f} s"
    )
    print(f"published {safety.published}, quarantined {safety.quarantined} {safety.flag_rates}")
    print(f"judge holdout accuracy {m['judge_holdout_accuracy']:.4f}")
    print(f"conditional accuracy   {m.get('conditional_accuracy', float('nan')):.4f}")
    print(f"MMD   gen vs holdout   {m['mmd']:.5f}  [{m['mmd_low']:.5f}, {m['mmd_high']:.5f}]")
    print(f"MMD   half vs half     {m['mmd_half']:.5f}  floor {m['mmd_floor_half']:.5f}")
    print(f"FID   half vs half     {m['fid_half']:.3f}  floor {m['fid_floor_half']:.3f}")
    print(f"occupancy mean         {m['occupancy_generated']:.4f} generated")
    print(f"                       {m['occupancy_holdout']:.4f} holdout")
    print(
        f"occupancy W1 half      {m['occupancy_w1_half']:.4f}  "
        f"floor {m['occupancy_w1_floor_half']:.4f}"
    )
    nan = float("nan")
    for name in dataset.class_names:
        print(
            f"{name:>8}: occupancy {m.get(f'occupancy/{name}/generated', nan):.4f} generated / "
            f"{m.get(f'occupancy/{name}/holdout', nan):.4f} holdout, fill ratio "
            f"{m.get(f'fill_ratio/{name}/generated', nan):.3f} / "
            f"{m.get(f'fill_ratio/{name}/holdout', nan):.3f}, "
            f"judge accuracy {m.get(f'accuracy/{name}', nan):.3f}"
        )
    print(f"report: {report}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"seconds": seconds, "metrics": m, "published": safety.published}, indent=2)
        )


if __name__ == "__main__":
    main()
