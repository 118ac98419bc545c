"""What orchestration and tracking cost: the nightly flow against the same stages run directly.

Runs the library's stages back to back with no Prefect and no MLflow (prepare, train, sample in
as many threads as the flow has shards, safety filter, evaluate, report), then the Prefect flow
with MLflow tracking and registration on the same config, each in a fresh DIFFPIPE_HOME. It prints
each step's wall time both ways and two measures of what orchestration and tracking cost:

- measured in the flow: the steps that are only tracking (register, compare, log), the flow body
  outside its steps and the time around the body (Prefect's flow start and local API, the model
  lock, the MLflow run's start and end). Free of compute noise; a lower bound.
- flow minus direct: the flow's wall time less the direct run's and less the flow's compute
  steps the direct run does not have (watermark). Includes every task's overhead, but also the
  run-to-run noise of the compute on a shared machine.

Shortened runs (``--set train.steps=200``) overstate the share; the projection scales train and
sample to the config's own steps and sample count and keeps the overhead fixed.

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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRACKING_STEPS = ("register", "compare", "log")  # flow steps that only talk to MLflow
FLOW_ONLY_COMPUTE = ("watermark",)  # flow steps with compute the direct run does not do
GOAL = 0.05


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


def overhead(plain: dict[str, float], piped: dict[str, Any]) -> dict[str, float]:
    """The two measures of orchestration and tracking time (see the module docstring)."""
    steps: dict[str, float] = piped["step_seconds"]
    tracking_steps = sum(steps.get(s, 0.0) for s in TRACKING_STEPS)
    body_outside = piped["wall_seconds"] - sum(steps.values())
    around_body = piped["outer_wall"] - piped["wall_seconds"]
    in_flow = tracking_steps + body_outside + around_body
    flow_only = sum(steps.get(s, 0.0) for s in FLOW_ONLY_COMPUTE)
    return {
        "tracking_steps_s": tracking_steps,
        "body_outside_steps_s": body_outside,
        "around_body_s": around_body,
        "measured_in_flow_s": in_flow,
        "flow_minus_direct_s": piped["outer_wall"] - plain["wall"] - flow_only,
    }


def projected_direct(plain: dict[str, float], run_cfg: Any, full_cfg: Any) -> float:
    """The direct run's wall time at the full config: train scaled by its steps, sample by its
    sample count, every other stage as measured."""
    scale = {
        "train": full_cfg.train.steps / run_cfg.train.steps,
        "sample": full_cfg.pipeline.num_samples / run_cfg.pipeline.num_samples,
    }
    return sum(s * scale.get(k, 1.0) for k, s in plain.items() if k != "wall")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    from diffpipe.flows.commands import parse_overrides

    from diffusion_core.config import load_config

    overrides = parse_overrides(args.set)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain = direct(args.config, overrides, Path(a))
        piped = flow(args.config, overrides, Path(b))
    wall = piped["outer_wall"]
    cost = overhead(plain, piped)
    full = projected_direct(plain, load_config(args.config, overrides), load_config(args.config))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    flow_steps: dict[str, float] = piped["step_seconds"]
    print(f"{'step':<22}{'direct s':>10}{'flow s':>10}{'flow - direct':>15}")
    for step in [*plain, *(s for s in flow_steps if s not in plain)]:
        if step == "wall":
            continue
        d, f = plain.get(step), flow_steps.get(step, 0.0)
        shown = f"{d:>10.1f}" if d is not None else f"{'':>10}"
        delta = f"{f - d:>15.1f}" if d is not None else f"{'':>15}"
        print(f"{step:<22}{shown}{f:>10.1f}{delta}")
    print(f"{'flow body, no step':<22}{'':>10}{cost['body_outside_steps_s']:>10.1f}")
    print(f"{'around the flow body':<22}{'':>10}{cost['around_body_s']:>10.1f}")
    print(f"{'total':<22}{plain['wall']:>10.1f}{wall:>10.1f}{wall - plain['wall']:>15.1f}")
    in_flow, minus = cost["measured_in_flow_s"], cost["flow_minus_direct_s"]
    print(
        f"orchestration and tracking, measured in the flow: {in_flow:.1f} s = "
        f"{in_flow / wall:.1%} of the flow (goal < {GOAL:.0%})"
    )
    print(f"orchestration and tracking, flow minus direct: {minus:.1f} s = {minus / wall:.1%}")
    print(
        f"projected onto the full config ({full:.0f} s of compute): "
        f"{in_flow / (full + in_flow):.1%} measured in the flow, "
        f"{max(minus, 0.0) / (full + max(minus, 0.0)):.1%} flow minus direct"
    )
    print(f"peak resident memory of this process: {rss:.0f} MiB")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "direct": plain,
                    "flow": piped,
                    "overhead": cost,
                    "share_in_flow": in_flow / wall,
                    "share_flow_minus_direct": minus / wall,
                    "projected_full_compute_s": full,
                    "peak_rss_mib": rss,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
