"""The pipeline's stages back to back with no Prefect and no MLflow: the library functions the
Prefect tasks call, in the flow's order (prepare, train, sample in shards, safety filter,
evaluate, report), on a local artefact store. Benchmarks time them against the flow, or read the
figures they produce."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from diffusion_core.config import RunConfig
from diffusion_core.pipeline.layout import RunLayout
from diffusion_core.pipeline.stages import dataset, evaluate, report, safety, sample, train
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.sampling import SampleRequest


@dataclass
class DirectRun:
    """What the stages returned, and the wall seconds of each."""

    dataset: dataset.DatasetRef
    checkpoint: train.CheckpointRef
    published: safety.SafetyRef
    evaluation: evaluate.Evaluation
    report_url: str
    seconds: dict[str, float] = field(default_factory=dict)


def run_stages(
    cfg: RunConfig,
    home: Path,
    *,
    run_id: str = "direct",
    on_step: Callable[[str, float], None] | None = None,
) -> DirectRun:
    """Run every stage of ``cfg`` under ``home`` (artefacts and work directory); the shards are
    sampled in as many threads as the flow maps tasks. ``on_step(name, seconds)`` after each."""
    store = ArtefactStore(str(home / "artefacts"))
    layout = RunLayout.pipeline_run(run_id)
    seconds: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def done(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[name] = now - last
        last = now
        if on_step is not None:
            on_step(name, seconds[name])

    data = dataset.prepare_dataset(cfg.data, store)
    done("prepare_dataset")
    ckpt = train.train_model(
        cfg, data, store, checkpoint_prefix=layout.checkpoint, work_dir=home / "work"
    )
    done("train")
    pc = cfg.pipeline
    request = SampleRequest.from_config(cfg.sample, num_samples=pc.num_samples)
    size = -(-pc.num_samples // pc.shards)

    def shard(i: int) -> sample.ShardRef:
        return sample.sample_shard(
            store, ckpt.prefix, request, out_prefix=layout.samples, shard=i, shard_size=size
        )

    with ThreadPoolExecutor(pc.shards) as pool:
        shards = list(pool.map(shard, range(pc.shards)))
    done("sample")
    published = safety.safety_filter(
        store, [s.prefix for s in shards], data, out_prefix=layout.safety, safety=cfg.safety
    )
    done("safety_filter")
    evaluation = evaluate.evaluate_samples(
        store,
        published.prefix,
        data,
        knobs=shards[0].knobs,
        nfe=shards[0].nfe,
        seed=request.seed,
        out_key=layout.metrics,
        evaluation=cfg.evaluation,
    )
    done("evaluate")
    inputs = report.ReportInputs(
        out_prefix=layout.report,
        run_id=run_id,
        model_name=cfg.name,
        model_version="0",
        config=cfg.to_dict(),
        diffusion=cfg.diffusion,  # the card's: training copies the config's section
        dataset=data,
        safety=published,
        metrics=evaluation.metrics,
        history=ckpt.history,
    )
    report_url = report.make_report(store, inputs)
    done("report")
    seconds["wall"] = time.perf_counter() - t0
    return DirectRun(data, ckpt, published, evaluation, report_url, seconds)
