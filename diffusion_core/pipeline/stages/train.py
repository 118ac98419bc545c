"""The training stage: train (or resume) a config on a stored dataset, in one process or in
``train.nproc`` processes under ``torchrun``, with every checkpoint committed to the artefact
store as it is written, so a lost worker, or a worker on another host, resumes where it stopped.

Checkpoints of one training live under ``training/<training identity>/step-NNNNNNN`` in the store
(the newest ``train.keep_checkpoints``), and under ``<work dir>/train-<identity>/`` on the worker.
Training resumes from the local copy, or, when there is none (a new host, a wiped disk), from the
store's newest. The finished checkpoint is committed under the run's ``checkpoint`` prefix with
this run's model card (its sampling defaults are this config's).

A warm start (``Parent``) names a stored checkpoint whose EMA weights start the training; their
sha256 enters the training identity, so a warm-started training never resumes a cold one.

``python -m diffusion_core.pipeline.stages.train SPEC.json`` is what each ``torchrun`` process
runs: the spec names the config, the dataset, the store, the work directory and the parent.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion_core.config import RunConfig
from diffusion_core.distributed import resolve_device
from diffusion_core.io import atomic_path
from diffusion_core.model import CARD_FILE, LATEST, ModelCard
from diffusion_core.pipeline.layout import training_prefix
from diffusion_core.pipeline.lock import hold
from diffusion_core.pipeline.stages.dataset import DatasetRef, open_split
from diffusion_core.pipeline.store import ArtefactStore
from diffusion_core.settings import settings
from diffusion_core.training import InitWeights, TrainingError, TrainResult, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointRef:
    prefix: str
    url: str
    steps: int  # the checkpoint's step
    steps_run: int  # steps this call ran (fewer than ``steps`` when it resumed, 0 when complete)
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"  # where rank 0 trained
    processes: int = 1


@dataclass(frozen=True)
class Parent:
    """A warm start: the checkpoint at ``prefix`` in the run's store (its ``ema.safetensors``,
    of ``sha256``, and its card), registered as ``model_uri``."""

    model_uri: str
    prefix: str
    sha256: str


def identity(cfg: RunConfig, dataset: DatasetRef, parent: Parent | None) -> str:
    """The training identity of ``cfg`` on ``dataset`` from ``parent``'s weights (or none)."""
    return cfg.training_identity(dataset.sha256, parent.sha256 if parent else None)


def work_dir_for(
    cfg: RunConfig, dataset: DatasetRef, work_dir: Path, parent: Parent | None = None
) -> Path:
    """The local training directory of ``cfg`` on ``dataset``: keyed by what changes the trained
    weights, so changing sampling, safety, evaluation or sharding resumes the same training."""
    return work_dir / f"train-{identity(cfg, dataset, parent)[:16]}"


def parent_weights(store: ArtefactStore, parent: Parent, local: Path) -> InitWeights:
    """The parent's EMA weights and card, fetched into ``local/init`` (verified by sha256)."""
    folder = local / "init"
    files = store.read_manifest(parent.prefix)["files"]
    for name in ("ema.safetensors", CARD_FILE):
        entry = files[name]
        store.get_file(
            f"{parent.prefix}/{name}", folder / name, sha256=entry["sha256"], size=entry["size"]
        )
    if files["ema.safetensors"]["sha256"] != parent.sha256:
        raise TrainingError(
            f"{store.url(parent.prefix)}: its EMA weights changed since {parent.model_uri} was "
            "chosen to start from"
        )
    card = ModelCard.read(folder / CARD_FILE)
    return InitWeights(folder / "ema.safetensors", card, parent.sha256, parent.model_uri)


def processes(cfg: RunConfig) -> int:
    """How many training processes ``train.nproc`` asks for on this machine."""
    if cfg.train.nproc != "auto":
        return int(cfg.train.nproc)
    device = resolve_device(cfg.runtime.device)
    return torch.cuda.device_count() if device.type == "cuda" else 1


# ----------------------------------------------------------------------------------------------
# Checkpoints in the store.


def stored_steps(store: ArtefactStore, prefix: str) -> list[int]:
    """The committed checkpoints under ``prefix``, by step."""
    found = {key.split("/")[-2] for key in store.list(prefix) if key.endswith("/manifest.json")}
    return sorted(int(name.removeprefix("step-")) for name in found if name.startswith("step-"))


def restore(store: ArtefactStore, prefix: str, local: Path) -> int | None:
    """When ``local`` holds no checkpoint, fetch the store's newest into it; its step, or None."""
    root = local / "checkpoints"
    if (root / LATEST).is_file():
        return None
    steps = stored_steps(store, prefix)
    if not steps:
        return None
    name = f"step-{steps[-1]:07d}"
    store.get_dir(f"{prefix}/{name}", root / name)
    (root / LATEST).write_text(name)
    log.info("resuming from %s/%s in the store", store.url(prefix), name)
    return steps[-1]


def committer(store: ArtefactStore, prefix: str, keep: int) -> Any:
    """A checkpoint callback: commit each checkpoint under ``prefix``, keep the newest ``keep``."""

    def commit(path: Path) -> None:
        store.put_dir(f"{prefix}/{path.name}", path)
        for old in stored_steps(store, prefix)[:-keep]:
            store.delete(f"{prefix}/step-{old:07d}")

    return commit


# ----------------------------------------------------------------------------------------------
# Training, in this process or under torchrun.


def run_training(
    cfg: RunConfig,
    dataset: DatasetRef,
    store: ArtefactStore,
    work_dir: Path,
    *,
    progress: bool,
    parent: Parent | None = None,
) -> TrainResult:
    """Train in this process (one rank of a torchrun, or alone) from the local checkpoint, if
    any, else from ``parent``'s weights or from scratch; rank 0 commits every checkpoint to the
    store; every rank reads only its part of each batch."""
    local = work_dir_for(cfg, dataset, work_dir, parent)
    prefix = training_prefix(identity(cfg, dataset, parent))
    train_set = open_split(store, dataset, "train", work_dir / "data")
    return train(
        cfg,
        train_set,
        local,
        progress=progress,
        on_checkpoint=committer(store, prefix, cfg.train.keep_checkpoints),
        init=None if parent is None else parent_weights(store, parent, local),
    )


@dataclass(frozen=True)
class TrainSpec:
    """What each torchrun process needs to train its rank."""

    config: dict[str, Any]
    dataset: str  # DatasetRef.to_json()
    artefact_root: str
    work_dir: str
    out_dir: str  # where rank 0 writes result.json, and every rank its error
    parent: dict[str, str] | None = None  # asdict(Parent) of a warm start

    def parent_ref(self) -> Parent | None:
        return None if self.parent is None else Parent(**self.parent)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))


@dataclass(frozen=True)
class Nodes:
    """How many machines train together, and where they meet (from the environment the work
    pool's job template sets: DIFFPIPE_NNODES, DIFFPIPE_NODE_RANK, DIFFPIPE_RDZV_ENDPOINT,
    DIFFPIPE_RDZV_ID)."""

    count: int = 1
    rank: int = 0
    endpoint: str = ""
    run_id: str = "diffpipe"

    @classmethod
    def from_env(cls) -> Nodes:
        env = settings()
        nodes = cls(env.nnodes, env.node_rank, env.rdzv_endpoint or "", env.rdzv_id)
        if nodes.count > 1 and not nodes.endpoint:
            raise TrainingError("DIFFPIPE_NNODES > 1 needs DIFFPIPE_RDZV_ENDPOINT (host:port)")
        return nodes

    def torchrun_args(self) -> list[str]:
        if self.count == 1:
            return ["--standalone"]
        return [
            f"--nnodes={self.count}",
            f"--node-rank={self.rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
        ]

    @property
    def spec_key(self) -> str:
        """Where node 0 leaves the training spec for the other nodes."""
        return f"training/nodes/{self.run_id}/spec.json"


def _torchrun(spec: TrainSpec, nproc: int, nodes: Nodes) -> dict[str, Any] | None:
    """Run ``nproc`` processes of this node under torchrun, their output streamed into this
    process's log; rank 0's ``result.json`` (None on the other nodes, which have no rank 0), or
    TrainingError with the failing rank's error. The exchange folder is removed either way."""
    out = Path(tempfile.mkdtemp(prefix="diffpipe-train-"))
    try:
        spec = TrainSpec(**{**asdict(spec), "out_dir": str(out)})
        spec_file = out / "spec.json"
        spec.write(spec_file)
        torchrun = [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args()]
        command = [*torchrun, f"--nproc-per-node={nproc}", "-m", __name__, str(spec_file)]
        log.info("training in %d processes: %s", nproc, " ".join(command))
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.info("%s", line.rstrip())
        errors = sorted(out.glob("error-rank*.txt"))
        if proc.returncode != 0 or errors:
            message = errors[0].read_text() if errors else f"torchrun exited with {proc.returncode}"
            raise TrainingError(f"distributed training failed: {message}")
        result = out / "result.json"
        return json.loads(result.read_text()) if result.exists() else None
    finally:
        shutil.rmtree(out, ignore_errors=True)


def train_node(store: ArtefactStore, *, work_dir: Path, timeout: float = 3600) -> None:
    """Another machine of a multi-node training (DIFFPIPE_NODE_RANK > 0): wait for node 0's
    spec in the store (one written after this node started, so never a finished run's), resume
    from the store's checkpoint like node 0, and run this node's processes until the training
    ends."""
    nodes = Nodes.from_env()
    if nodes.count < 2 or nodes.rank < 1:
        raise TrainingError(
            "train-node is for the other machines of a multi-node training: set "
            "DIFFPIPE_NNODES >= 2 and DIFFPIPE_NODE_RANK >= 1 (node 0 is the flow's train step)"
        )
    started, deadline = time.time(), time.monotonic() + timeout
    while True:
        if store.exists(nodes.spec_key):
            written = store.read_json(nodes.spec_key)
            if written.get("written_at", 0) >= started - SPEC_GRACE_S:
                break
        if time.monotonic() > deadline:
            raise TrainingError(
                f"no training spec at {store.url(nodes.spec_key)} after {timeout:.0f} s"
            )
        time.sleep(1)
    spec = TrainSpec(**{**written["spec"], "work_dir": str(work_dir)})
    cfg = RunConfig.model_validate(spec.config)
    dataset = DatasetRef.from_json(spec.dataset, dims=cfg.model.dims)
    parent = spec.parent_ref()
    restore(
        store,
        training_prefix(identity(cfg, dataset, parent)),
        work_dir_for(cfg, dataset, work_dir, parent),
    )
    _torchrun(spec, processes(cfg), nodes)


LOCK_GRACE_S = 10.0  # how long training waits for its directory's lock

# How much older than a waiting node a spec may be: node 0 may start a little before the others.
SPEC_GRACE_S = 600.0


def train_model(
    cfg: RunConfig,
    dataset: DatasetRef,
    store: ArtefactStore,
    *,
    checkpoint_prefix: str,
    work_dir: Path,
    progress: bool = False,
    parent: Parent | None = None,
) -> CheckpointRef:
    """Train (an interrupted run resumes from the local or the stored checkpoint, a finished one
    runs 0 steps; a new one starts from ``parent``'s weights when given), then commit the final
    checkpoint under ``checkpoint_prefix`` with this run's card."""
    local = work_dir_for(cfg, dataset, work_dir, parent)
    # Two live runs never train into one directory (the lock goes when this process does); the
    # grace covers another run's start-up cleanup, which holds the lock for a moment.
    lock = local.with_name(local.name + ".lock")
    with hold(lock, what=f"training directory {local}", owner={}, wait=LOCK_GRACE_S):
        return _train_model(cfg, dataset, store, checkpoint_prefix, work_dir, progress, parent)


def _train_model(
    cfg: RunConfig,
    dataset: DatasetRef,
    store: ArtefactStore,
    checkpoint_prefix: str,
    work_dir: Path,
    progress: bool,
    parent: Parent | None,
) -> CheckpointRef:
    nproc, nodes = processes(cfg), Nodes.from_env()
    prefix = training_prefix(identity(cfg, dataset, parent))
    restore(store, prefix, work_dir_for(cfg, dataset, work_dir, parent))  # before any rank starts
    if nproc > 1 or nodes.count > 1:
        spec = TrainSpec(
            cfg.to_dict(),
            dataset.to_json(),
            store.root,
            str(work_dir),
            "",
            None if parent is None else asdict(parent),
        )
        if nodes.count > 1:  # the other nodes read it (diffpipe train-node)
            store.write_json(nodes.spec_key, {"spec": asdict(spec), "written_at": time.time()})
        try:
            result = _torchrun(spec, nproc, nodes)
        finally:
            if nodes.count > 1:
                store.delete(nodes.spec_key)
        if result is None:
            raise TrainingError("distributed training ended without rank 0's result")
        checkpoint, card = Path(result["checkpoint"]), ModelCard.from_dict(result["card"])
        steps_run, ips, history = result["steps"], result["images_per_second"], result["history"]
        device = result["device"]
    else:
        done = run_training(cfg, dataset, store, work_dir, progress=progress, parent=parent)
        checkpoint, card, steps_run = done.checkpoint, done.card, done.steps
        ips, history = done.images_per_second, done.history
        device = str(resolve_device(cfg.runtime.device))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "checkpoint"
        shutil.copytree(checkpoint, staged)
        (staged / CARD_FILE).write_text(card.to_json())
        store.put_dir(checkpoint_prefix, staged)
    steps = int(history[-1]["step"]) if history else cfg.train.steps
    url = store.url(checkpoint_prefix)
    total = nproc * nodes.count
    return CheckpointRef(checkpoint_prefix, url, steps, steps_run, ips, history, device, total)


def main(spec_path: str) -> None:
    """One torchrun process: train its rank; rank 0 writes ``result.json``, and any rank that
    fails writes ``error-rank<r>.txt`` (the error the parent reports)."""
    spec = TrainSpec(**json.loads(Path(spec_path).read_text()))
    out = Path(spec.out_dir)
    rank = settings().rank
    try:
        cfg = RunConfig.model_validate(spec.config)
        dataset = DatasetRef.from_json(spec.dataset, dims=cfg.model.dims)
        store = ArtefactStore(spec.artefact_root)
        done = run_training(
            cfg, dataset, store, Path(spec.work_dir), progress=False, parent=spec.parent_ref()
        )
        if rank == 0:  # torchrun's rank: the process group is left by now, so every process
            result = {  # would call itself rank 0 of 1 and write (interleaved) result.json
                "checkpoint": str(done.checkpoint),
                "card": done.card.model_dump(mode="json"),
                "steps": done.steps,
                "images_per_second": done.images_per_second,
                "history": done.history,
                "device": str(resolve_device(cfg.runtime.device)),
            }
            with atomic_path(out / "result.json") as tmp:
                tmp.write_text(json.dumps(result))
    except Exception as exc:
        (out / f"error-rank{rank}.txt").write_text(f"rank {rank}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        raise


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1])
