"""Bulk sampling on a Dask cluster: the pipeline's sample step at 1 and 2 workers.

Trains the config's network for a couple of steps (sampling speed does not depend on the
weights), then runs the pipeline's `sample` flow (the step the nightly and evaluation flows run)
on a local Dask cluster of 1 worker and of 2 workers, one thread each, and on Prefect's thread
runner in the flow's process as the reference. Each worker writes its shards to the store.
Prints images per second and the 2-vs-1 worker scaling ratio.

    python bench/scale_sampling.py [--config configs/quickstart.yaml] [--samples 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="diffpipe-scale-"))
    os.environ["DIFFPIPE_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from diffpipe.flows.pipeline import sample_all
    from diffpipe.flows.runners import task_runner

    from diffusion_core.config import load_config
    from diffusion_core.pipeline.stages import dataset, train
    from diffusion_core.pipeline.store import ArtefactStore
    from diffusion_core.sampling import SampleRequest

    cfg = load_config(args.config, {"train.steps": 2, "train.checkpoint_every": 2})
    store = ArtefactStore(str(home / "artefacts"))
    data = dataset.prepare_dataset(cfg.data, store)
    ckpt = train.train_model(cfg, data, store, checkpoint_prefix="bench/checkpoint",
                             work_dir=home / "work")  # fmt: skip
    request = SampleRequest.from_config(cfg.sample, num_samples=args.samples)
    print(
        f"{cfg.name}: {args.samples} samples, {cfg.sample.sampler} {cfg.sample.steps} steps, "
        f"guidance {cfg.sample.guidance_scale}, {args.shards} shards; "
        f"{os.cpu_count()} cores, {cpu_name()}"
    )

    def timed(runner: dict, repeats: int) -> tuple[float, set[str]]:
        """Best wall seconds of the sample step over ``repeats`` runs after one warm-up run."""
        runtime = cfg.runtime.model_copy(
            update={"task_runner": cfg.runtime.task_runner.model_copy(update=runner)}
        )
        best, workers = float("inf"), set()
        for repeat in range(repeats + 1):
            t0 = time.perf_counter()
            shards = sample_all.with_options(task_runner=task_runner(runtime.task_runner))(
                store.root, ckpt.prefix, request, f"bench/{repeat}", args.shards, runtime
            )
            seconds = time.perf_counter() - t0
            workers |= {s.worker for s in shards}
            if repeat or not repeats:
                best = min(best, seconds)
        return best, workers

    def report(label: str, seconds: float, workers: set[str]) -> float:
        rate = args.samples / seconds
        print(f"  {label:<44} {rate:6.1f} img/s  ({seconds:5.1f} s, {len(workers)} processes)")
        return rate

    from dask.distributed import LocalCluster

    rates: dict[str, float] = {}
    rates["threads"] = report("thread runner, in the flow's process", *timed({}, args.repeats))
    for n in (1, 2):
        # A running cluster (as with runtime.task_runner.address): the steady-state rate.
        with LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster:
            runner = {"kind": "dask", "address": cluster.scheduler_address}
            rates[n] = report(
                f"dask cluster, {n} worker(s) x 1 thread", *timed(runner, args.repeats)
            )
    # A local cluster started for the run (no address): what one pipeline step costs.
    runner = {"kind": "dask", "n_workers": 2, "threads_per_worker": 1}
    report("dask, local cluster started by the step (2)", *timed(runner, 0))
    print(f"  scaling, 2 vs 1 Dask worker: {rates[2] / rates[1]:.2f}x")
    print(f"  2 Dask workers vs the thread runner: {rates[2] / rates['threads']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
