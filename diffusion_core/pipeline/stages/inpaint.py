"""The inpainting stage: RePaint against plain replacement on holdout images with the standard
masks (``diffusion_core.evaluation.inpainting``)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from diffusion_core.config import DEFAULT_RUNTIME, InpaintEvalConfig, RuntimeConfig
from diffusion_core.distributed import inference_dtype, resolve_device
from diffusion_core.evaluation import inpainting
from diffusion_core.pipeline.stages.dataset import DatasetRef, read_split
from diffusion_core.pipeline.stages.sample import fetch_model
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.sampling import SampleRequest


@dataclass(frozen=True)
class InpaintEvaluation:
    prefix: str
    metrics: dict[str, float]  # inpaint/<mask>/<method>/<stat>, inpaint/known_region_exact
    rows: list[dict[str, Any]]  # one per (mask kind, method)
    device: str = "cpu"


def evaluate_inpainting(
    store: ArtefactStore,
    checkpoint_prefix: str,
    dataset: DatasetRef,
    *,
    request: SampleRequest,
    config: InpaintEvalConfig,
    out_prefix: str,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> InpaintEvaluation:
    """RePaint against plain replacement on the first holdout images with the standard masks;
    commits ``summary.json`` (rows, metrics, config) and ``examples.safetensors`` (the report's
    example completions) under ``out_prefix``."""
    holdout = read_split(store, dataset, "holdout")
    device = resolve_device(runtime.device)
    net, card = fetch_model(store, checkpoint_prefix, device)
    dtype = inference_dtype(device, runtime.precision)
    result = inpainting.evaluate_inpainting(net, card, request, holdout.images, config, dtype=dtype)
    metrics = inpainting.inpainting_metrics(result.rows)
    with tempfile.TemporaryDirectory() as tmp:
        summary = {"metrics": metrics, "rows": result.rows, "config": config.model_dump()}
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2))
        save_file({"images": result.examples.contiguous()}, Path(tmp) / "examples.safetensors")
        store.put_dir(out_prefix, tmp)
    return InpaintEvaluation(out_prefix, metrics, result.rows, str(device))


def read_inpainting(store: ArtefactStore, prefix: str) -> tuple[list[dict[str, Any]], Tensor]:
    """The rows and example images committed by ``evaluate_inpainting``."""
    with tempfile.TemporaryDirectory() as tmp:
        store.get_dir(prefix, tmp)
        rows = json.loads((Path(tmp) / "summary.json").read_text())["rows"]
        return rows, load_file(Path(tmp) / "examples.safetensors")["images"]
