"""The sampling stage: one shard of a run's samples, drawn from a stored checkpoint and committed
with its per-sample metadata."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffusion_core.config import DEFAULT_RUNTIME, RuntimeConfig, SamplingDefaults
from diffusion_core.distributed import inference_dtype, resolve_device
from diffusion_core.model import ModelCard, load_model
from diffusion_core.pipeline.modality import modality
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.sampling import SampleRequest, generate
from diffusion_core.unet import UNet


@dataclass(frozen=True)
class ShardRef:
    prefix: str
    count: int
    seconds: float
    nfe: int
    knobs: SamplingDefaults  # the sampling settings the shard was drawn with
    device: str = "cpu"  # where the network ran
    worker: str = ""  # host:pid of the process that drew the shard


def fetch_model(
    store: ArtefactStore, checkpoint_prefix: str, device: torch.device | str = "cpu"
) -> tuple[UNet, ModelCard]:
    """The EMA network (on ``device``) and card of a checkpoint committed in the store."""
    with tempfile.TemporaryDirectory() as tmp:
        store.get_dir(checkpoint_prefix, tmp)
        net, card = load_model(tmp)
    return net.to(device), card


def sample_shard(
    store: ArtefactStore,
    checkpoint_prefix: str,
    request: SampleRequest,
    *,
    out_prefix: str,
    shard: int,
    shard_size: int,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> ShardRef:
    """Samples [shard * shard_size, ...) of the ``request.count()`` a run draws (the same images,
    labels and prompts as one unsharded call, see ``sampling.generate``), committed under
    ``out_prefix/shard-NNNNN``. The network runs on ``runtime.device``."""
    device = resolve_device(runtime.device)
    net, card = fetch_model(store, checkpoint_prefix, device)
    dtype = inference_dtype(device, runtime.precision)
    total = request.count()
    start, stop = shard * shard_size, min(total, (shard + 1) * shard_size)
    part: dict[str, Any] = {"num_samples": stop - start}
    if request.labels is not None and len(request.labels) > 1:  # one label per sample
        part["labels"] = request.labels[start:stop]
    t0 = time.perf_counter()
    samples = generate(
        net,
        card,
        request.model_copy(update=part),
        offset=start,
        dtype=dtype,
        compile=runtime.compile,
    )
    seconds = time.perf_counter() - t0
    knobs = samples.knobs
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tensors = {"images": samples.images, "seeds": samples.seeds}
        if samples.labels is not None:
            tensors["labels"] = samples.labels
        save_file(tensors, out / "images.safetensors")
        modality(card.dims).write_extras(samples.images, out)
        with open(out / "metadata.jsonl", "w") as f:
            for i in range(len(samples.images)):
                record: dict[str, Any] = {
                    "id": start + i,
                    "seed": int(samples.seeds[i]),
                    "label": None if samples.labels is None else int(samples.labels[i]),
                    "sampler": knobs.sampler,
                    "steps": knobs.steps,
                    "nfe": samples.nfe,
                    "guidance_scale": knobs.guidance_scale,
                }
                if samples.prompts is not None:
                    record["prompt"] = samples.prompts[i]
                f.write(json.dumps(record) + "\n")
        prefix = f"{out_prefix}/shard-{shard:05d}"
        store.put_dir(prefix, out)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return ShardRef(prefix, len(samples.images), seconds, samples.nfe, knobs, str(device), worker)


SIDE_BY_SIDE_FILE = "side_by_side.safetensors"


def side_by_side(
    store: ArtefactStore,
    challenger_prefix: str,
    champion_prefix: str,
    request: SampleRequest,
    *,
    out_prefix: str,
    count: int = 20,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> str:
    """``count`` samples of the challenger and of the champion with the same seeds, labels and
    knobs (``request``'s first ``count``), committed as one file under ``out_prefix`` for the
    report; its prefix."""
    device = resolve_device(runtime.device)
    dtype = inference_dtype(device, runtime.precision)
    part = request.model_copy(update={"num_samples": min(count, request.count())})
    if request.labels is not None and len(request.labels) > 1:
        part = part.model_copy(update={"labels": request.labels[: part.num_samples]})
    tensors: dict[str, Tensor] = {}
    for who, prefix in (("challenger", challenger_prefix), ("champion", champion_prefix)):
        net, card = fetch_model(store, prefix, device)
        samples = generate(net, card, part, dtype=dtype)
        tensors[who] = samples.images
        if samples.labels is not None:
            tensors["labels"] = samples.labels
        tensors["seeds"] = samples.seeds
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, Path(tmp) / SIDE_BY_SIDE_FILE)
        store.put_dir(out_prefix, tmp)
    return out_prefix


def read_tensors(store: ArtefactStore, prefix: str, name: str) -> dict[str, Tensor]:
    """The safetensors file ``name`` of the committed directory ``prefix``."""
    with tempfile.TemporaryDirectory() as tmp:
        store.get_dir(prefix, tmp)
        return load_file(Path(tmp) / name)


def read_shards(store: ArtefactStore, prefixes: list[str]) -> dict[str, Tensor]:
    """The shards' tensors, concatenated in shard order."""
    parts = [read_tensors(store, p, "images.safetensors") for p in prefixes]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
