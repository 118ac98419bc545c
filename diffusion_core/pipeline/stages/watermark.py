"""The watermark stage: mark the published images with the model's name tag and version."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from diffusion_core import watermark as wm
from diffusion_core.config import WatermarkConfig
from diffusion_core.io import psnr
from diffusion_core.pipeline.stages.safety import SafetyRef, read_published
from diffusion_core.pipeline.store import ArtefactStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatermarkRef:
    prefix: str
    marked: int
    model_name: str
    model_version: str
    key_id: str
    strength: float
    psnr_mean: float | None
    psnr_min: float | None
    safety: SafetyRef  # the filter's decision, with ``prefix`` pointing at the marked images

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "safety"}


def watermark_published(
    store: ArtefactStore,
    safety: SafetyRef,
    *,
    out_prefix: str,
    model_name: str,
    model_version: str,
    run_id: str,
    cfg: WatermarkConfig,
) -> WatermarkRef:
    """Mark the published images of a filtered run with the model's name tag and version and
    commit them under ``out_prefix``: ``published.safetensors`` (the marked images with their
    labels and seeds), ``NNNNN.png`` (the same, with provenance tEXt) and ``watermark.json``.

    Only the published set is read; the safety directory is left as the filter wrote it. The
    returned ``safety`` points at ``out_prefix``, so what reads the published images next
    (evaluation, report) reads the marked ones. Every marked image is decoded again before the
    commit, and one that does not hold the payload fails the stage (nothing is committed).
    Re-running returns the committed record.
    """
    if store.exists_dir(out_prefix):
        return _watermark_ref(store.read_json(f"{out_prefix}/watermark.json")["ref"])
    key = wm.load_key(key_file=cfg.key_file, key_env=cfg.key_env, create=True)
    payload = wm.Payload.for_model(model_name, model_version)
    provenance = wm.Provenance(model_name, model_version, run_id, key.key_id)
    published = read_published(store, safety.prefix)
    images = published["images"]
    marked = wm.embed(images, payload, key, strength=cfg.strength)
    readings = wm.decode(marked, key, strength=cfg.strength)
    failed = [i for i, r in enumerate(readings) if r.payload != payload]
    if failed:
        raise wm.WatermarkError(
            f"{safety.prefix}: {len(failed)} of {len(images)} published images do not hold the "
            f"mark after embedding (first: {failed[:5]}); raise pipeline.watermark.strength"
        )
    psnrs = [psnr(a, b) for a, b in zip(images, marked, strict=True)]
    ref = WatermarkRef(
        prefix=out_prefix,
        marked=len(marked),
        model_name=model_name,
        model_version=model_version,
        key_id=key.key_id,
        strength=cfg.strength,
        psnr_mean=float(np.mean(psnrs)) if psnrs else None,
        psnr_min=float(np.min(psnrs)) if psnrs else None,
        safety=replace(safety, prefix=out_prefix),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_file({**published, "images": marked.contiguous()}, out / "published.safetensors")
        for i, image in enumerate(marked):
            wm.save_png(image, out / f"{i:05d}.png", provenance)
        record = {"ref": asdict(ref), "scheme": wm.SCHEME, "payload_bits": wm.PAYLOAD_BITS}
        (out / "watermark.json").write_text(json.dumps(record, indent=2))
        store.put_dir(out_prefix, out)
    log.info("watermarked %d published images (key id %s)", ref.marked, ref.key_id)
    return ref


def _watermark_ref(record: dict[str, Any]) -> WatermarkRef:
    return WatermarkRef(**{**record, "safety": SafetyRef(**record["safety"])})
