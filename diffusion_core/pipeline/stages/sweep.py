"""The sweep stage: quality against sampling cost over ``evaluation.sweep`` (see
``diffusion_core.evaluation.sweep``), committed as ``sweep.csv`` and ``sweep.json``."""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor

from diffusion_core.config import DEFAULT_RUNTIME, EvaluationConfig, RuntimeConfig
from diffusion_core.distributed import inference_dtype, resolve_device
from diffusion_core.evaluation import quality
from diffusion_core.evaluation.fidelity import extract
from diffusion_core.evaluation.sweep import paired_matches, run_sweep
from diffusion_core.pipeline.stages.dataset import DatasetRef, read_split
from diffusion_core.pipeline.stages.evaluate import evaluation_extractor, evaluation_reference
from diffusion_core.pipeline.stages.sample import fetch_model
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.sampling import SampleRequest


@dataclass(frozen=True)
class SweepRef:
    prefix: str
    rows: list[dict[str, Any]]
    note: str  # which setting matches the reference setting with the fewest NFE (paired test)
    match: dict[str, Any] | None


def sweep_samplers(
    store: ArtefactStore,
    checkpoint_prefix: str,
    dataset: DatasetRef,
    *,
    request: SampleRequest,
    evaluation: EvaluationConfig,
    out_prefix: str,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> SweepRef:
    """One row per ``evaluation.sweep`` setting, each at ``evaluation.sweep_num_samples``
    samples with the other knobs of ``request`` (or the card's), with its paired FID gap to the
    reference setting (``evaluation.sweep.paired_matches``) against the holdout. Sweep samples
    are judged raw (no safety filter) and never published."""
    ec = evaluation
    if not ec.sweep:
        raise ValueError("evaluation.sweep is empty: nothing to sweep")
    holdout = read_split(store, dataset, "holdout")
    device = resolve_device(runtime.device)
    net, card = fetch_model(store, checkpoint_prefix, device)
    with tempfile.TemporaryDirectory() as tmp:
        extractor, _ = evaluation_extractor(store, dataset, ec, Path(tmp), device)
        score = partial(
            quality.score,
            reference=holdout.images,
            extractor=extractor,
            device=device,
            batch_size=ec.batch_size,
            draws=ec.interval_draws,
            level=ec.interval_level,
            seed=request.seed,
        )
        kept: list[Tensor] = []  # each setting's features, as its score extracted them
        base = request.model_copy(update={"num_samples": ec.sweep_num_samples})
        dtype = inference_dtype(device, runtime.precision)
        rows = run_sweep(
            net, card, base, ec.sweep, score=partial(score, keep_features=kept), dtype=dtype
        )
        holdout_features = extract(
            holdout.images, extractor, device=device, batch_size=ec.batch_size
        )[extractor.layer("fid")]
        best = paired_matches(
            rows,
            kept,
            holdout_features,
            draws=ec.interval_draws,
            level=ec.interval_level,
            seed=request.seed,
        )
    rows = best.pop("rows")
    record = {**evaluation_reference(extractor, ec, dataset, len(holdout)), "safety_filter": False}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with open(out / "sweep.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "sweep.json").write_text(
            json.dumps({"rows": rows, **best, "record": record}, indent=2)
        )
        store.put_dir(out_prefix, out)
    return SweepRef(out_prefix, rows, best["note"], best["match"])
