"""What orchestration and tracking cost: the nightly flow against the same stages run directly.

Runs the library's stages back to back with no Prefect and no MLflow (prepare, train, sample in
as many threads as the flow has shards, safety filter, evaluate, report), then the Prefect flow
with MLflow tracking and registration on the same config, each in a fresh DIFFPIPE_HOME. The
difference in wall time is the share spent in orchestration and tracking rather than compute.

    python bench/pipeline_overhead.py [--config configs/quickstart.yaml] [--set train.steps=200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def direct(config: str, overrides: dict, home: Path) -> dict[str, float]:
    from diffusion_core import stages
    from diffusion_core.config import load_config
    from diffusion_core.storage import ArtefactStore

    cfg = load_config(config, overrides)
    store = ArtefactStore(str(home / "artefacts"))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset = stages.prepare_dataset(cfg.data, store)
    seconds["prepare_dataset"] = time.perf_counter() - t0
    t = time.perf_counter()
    ckpt = stages.train_model(cfg, dataset, store, run_prefix="runs/direct", work_dir=home / "work")
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    pc = cfg.pipeline
    size = -(-pc.num_samples // pc.shards)
    with ThreadPoolExecutor(pc.shards) as pool:
        shards = list(
            pool.map(
                lambda i: stages.sample_shard(
                    store,
                    ckpt.prefix,
                    cfg.sample,
                    out_prefix="runs/direct/samples",
                    shard=i,
                    shard_size=size,
                    total=pc.num_samples,
                ),
                range(pc.shards),
            )
        )
    seconds["sample"] = time.perf_counter() - t
    t = time.perf_counter()
    safety = stages.safety_filter(
        store, [s.prefix for s in shards], dataset, out_prefix="runs/direct/safety",
        safety=cfg.safety,
    )  # fmt: skip
    seconds["safety_filter"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluation = stages.evaluate_samples(
        store, safety.prefix, dataset, sample=cfg.sample, out_key="runs/direct/metrics.json"
    )
    seconds["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    stages.make_report(
        store,
        stages.ReportInputs(
            run_prefix="runs/direct", run_id="direct", model_name=cfg.name, model_version="0",
            config=cfg.to_dict(), dataset=dataset, safety=safety, metrics=evaluation.metrics,
            history=ckpt.history,
        ),
    )  # fmt: skip
    seconds["report"] = time.perf_counter() - t
    seconds["wall"] = time.perf_counter() - t0
    return seconds


def flow(config: str, overrides: dict, home: Path) -> dict:
    os.environ["DIFFPIPE_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from flows.pipeline import nightly

    t0 = time.perf_counter()
    summary = nightly(config_path=config, overrides=overrides)
    summary["outer_wall"] = time.perf_counter() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    from flows.cli import parse_overrides

    overrides = parse_overrides(args.set)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain = direct(args.config, overrides, Path(a))
        piped = flow(args.config, overrides, Path(b))
    wall = piped["outer_wall"]
    share = (wall - plain["wall"]) / wall
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'step':<16}{'direct s':>10}{'flow s':>10}")
    for step, s in plain.items():
        if step != "wall":
            print(f"{step:<16}{s:>10.1f}{piped['step_seconds'].get(step, 0.0):>10.1f}")
    print(f"{'register':<16}{'':>10}{piped['step_seconds'].get('register', 0.0):>10.1f}")
    print(f"{'compare':<16}{'':>10}{piped['step_seconds'].get('compare', 0.0):>10.1f}")
    print(f"{'total':<16}{plain['wall']:>10.1f}{wall:>10.1f}")
    print(f"orchestration and tracking: {wall - plain['wall']:.1f} s = {share:.1%} of the flow")
    print(f"peak resident memory of this process: {rss:.0f} MiB")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"direct": plain, "flow": piped, "share": share, "peak_rss_mib": rss},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
