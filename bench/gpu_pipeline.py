"""The quickstart pipeline end to end on one device, then the sampling throughput of its sample
step: the table bench/gpu_pipeline.sh prints on a GPU machine.

Runs the nightly flow (prepare, train, register, sample, safety filter, watermark, evaluate,
report) with ``runtime.device`` set, in a fresh DIFFPIPE_HOME, and prints each step's wall
seconds next to the device the step recorded. Then draws ``--samples`` images from the trained
checkpoint through the sample step's function (one shard, model loading excluded) in fp32 and in
bf16 and prints images per second.

    python bench/gpu_pipeline.py --device cuda [--set train.steps=200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--samples", type=int, default=2000, help="for the throughput figure")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="diffpipe-gpu-"))
    os.environ["DIFFPIPE_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from diffpipe.flows.commands import parse_overrides
    from diffpipe.flows.pipeline import nightly

    from diffusion_core.config import load_config
    from diffusion_core.pipeline.stages.sample import sample_shard
    from diffusion_core.pipeline.store import ArtefactStore, default_root
    from diffusion_core.sampling import SampleRequest

    overrides = parse_overrides(args.set) | {"runtime.device": args.device}
    cfg = load_config(args.config, overrides)
    print(f"{cfg.name} on {args.device}: {device_name(args.device)}", flush=True)
    t0 = time.perf_counter()
    summary = nightly(config=cfg)
    wall = time.perf_counter() - t0
    devices = summary["devices"]
    print("\n| step | seconds | device |\n|---|---:|---|")
    for step, seconds in summary["step_seconds"].items():
        device = devices.get(step, "")
        if step == "train":
            device = f"{devices['train']} x {devices['train_processes']}"
        print(f"| {step} | {seconds:.1f} | {device} |")
    print(f"| flow wall (incl. Prefect, MLflow) | {wall:.1f} | |")
    print(
        f"\nFID {summary['metrics']['fid']:.3f}, published {summary['samples']['published']}, "
        f"quarantined {summary['samples']['quarantined']}"
    )

    root = ArtefactStore(cfg.pipeline.artefact_root or default_root()).root
    prefix = summary["checkpoint_url"].removeprefix(root).strip("/")
    store = ArtefactStore(root)
    request = SampleRequest.from_config(cfg.sample, num_samples=args.samples)
    rates = {}
    for precision in ("fp32", "bf16"):
        runtime = cfg.runtime.model_copy(update={"precision": precision})
        shard = sample_shard(
            store,
            prefix,
            request,
            out_prefix=f"bench/{precision}",
            shard=0,
            shard_size=args.samples,
            runtime=runtime,
        )
        rates[precision] = shard.count / shard.seconds
        print(
            f"sample step, {precision}: {rates[precision]:.0f} img/s ({shard.count} images, "
            f"{cfg.sample.sampler} {cfg.sample.steps} steps, guidance {cfg.sample.guidance_scale}, "
            f"{shard.nfe} network evaluations each, device {shard.device})"
        )
    if args.json:
        figures = {
            "device": args.device,
            "device_name": device_name(args.device),
            "step_seconds": summary["step_seconds"],
            "devices": devices,
            "wall_seconds": wall,
            "sample_img_per_s": rates,
            "fid": summary["metrics"]["fid"],
        }
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
