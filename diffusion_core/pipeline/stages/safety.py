"""The safety stage: run the configured detector chain over every sample, publish what passes and
quarantine the rest with its scores and reasons."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from diffusion_core.config import DEFAULT_RUNTIME, RuntimeConfig, SafetyConfig
from diffusion_core.distributed import resolve_device
from diffusion_core.evaluation.judge import TrainedClassifier
from diffusion_core.pipeline.modality import modality
from diffusion_core.pipeline.stages.dataset import (
    DatasetRef,
    domain_classifier,
    pixel_memorisation,
    read_split,
)
from diffusion_core.pipeline.stages.sample import read_shards, read_tensors
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.safety.chain import build_chain, filter_images
from diffusion_core.safety.detector import SafetyContext


@dataclass(frozen=True)
class SafetyRef:
    prefix: str
    published: int
    quarantined: int
    flag_rates: dict[str, float]
    flag_counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"  # where the network detectors ran

    def rates(self) -> dict[str, float]:
        """The shares the promotion guardrails watch: every quarantined sample
        (``safety_flag_rate``), and the memorisation detector's flags when it ran."""
        total = self.published + self.quarantined
        out = {"safety_flag_rate": self.quarantined / total if total else 0.0}
        if "memorisation" in self.flag_rates:
            out["memorisation_flag_rate"] = float(self.flag_rates["memorisation"])
        return out


def safety_filter(
    store: ArtefactStore,
    shard_prefixes: list[str],
    dataset: DatasetRef,
    *,
    out_prefix: str,
    safety: SafetyConfig,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> SafetyRef:
    """Run the configured detector chain over every sample; publish what passes, quarantine
    the rest with its scores and reasons, and log every decision to ``audit.jsonl``.

    Committed as one directory (``published.safetensors``, ``quarantine/images.safetensors``,
    ``quarantine/records.jsonl``, ``audit.jsonl``, ``summary.json``), so readers see all of it
    or none. Sample ids are positions in the concatenated shards, which hold ids in order. The
    detectors' networks (the domain classifier, CLIP) run on ``runtime.device``.
    """
    device = resolve_device(runtime.device)
    samples = read_shards(store, shard_prefixes)
    train_set = read_split(store, dataset, "train")
    kind = modality(dataset.dims)
    images, train_images = kind.safety_view(samples["images"]), kind.safety_view(train_set.images)
    judge: list[TrainedClassifier] = []

    def features(images: Tensor) -> Tensor:  # the domain classifier, fetched on first use
        if not judge:
            judge.append(domain_classifier(store, dataset, device)[0])
        return judge[0].features(images)

    context = SafetyContext(
        train_images=train_images,
        labels=samples.get("labels"),
        metadata={"out_prefix": out_prefix},
        features=features if kind.judge_reads_views() else None,
    )
    n = len(images)
    safety = kind.safety_config(pixel_memorisation(safety, dataset))
    chain = build_chain(safety, device=str(device))
    decision = filter_images(images, context, chain, sample_ids=range(n))
    keep = decision.published
    samples = {**samples, "sample_ids": torch.arange(n)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "quarantine").mkdir()
        for path, mask in (
            ("published.safetensors", keep),
            ("quarantine/images.safetensors", ~keep),
        ):
            save_file({k: v[mask].contiguous() for k, v in samples.items()}, out / path)
        with (
            open(out / "audit.jsonl", "w") as audit,
            open(out / "quarantine/records.jsonl", "w") as q,
        ):
            for record in decision.records:
                line = json.dumps(record) + "\n"
                audit.write(line)
                if record["decision"] == "quarantine":
                    q.write(line)
        ref = SafetyRef(
            out_prefix,
            int(keep.sum()),
            int((~keep).sum()),
            decision.flag_rates(),
            decision.flag_counts(),
            dict(decision.failures),
            str(device),
        )
        summary = {**asdict(ref), "safety": safety.model_dump(mode="json")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        store.put_dir(out_prefix, out)
    return ref


def read_published(store: ArtefactStore, safety_prefix: str) -> dict[str, Tensor]:
    """The published samples of a filter (or watermark) directory."""
    return read_tensors(store, safety_prefix, "published.safetensors")
