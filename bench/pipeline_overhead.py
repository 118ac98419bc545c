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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def direct(config: str, overrides: dict, home: Path) -> dict[str, float]:
    from direct_stages import run_stages

    from diffusion_core.config import load_config

    return run_stages(load_config(config, overrides), home).seconds


def flow(config: str, overrides: dict, home: Path) -> dict:
    os.environ["DIFFPIPE_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from diffpipe.flows.pipeline import nightly

    t0 = time.perf_counter()
    summary = nightly(config=config, overrides=overrides)
    summary["outer_wall"] = time.perf_counter() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    from diffpipe.flows.commands import parse_overrides

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
