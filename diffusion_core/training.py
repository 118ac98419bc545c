"""The trainer: bf16 autocast, EMA (``diffusion_core.ema``), clipping, warm-up, atomic checkpoints,
exact resume, DDP.

Exact resume: a checkpoint holds the weights, the EMA, the optimizer and LR-scheduler state, the
step and every random generator, and the batch of step s is a function of s alone
(:class:`BatchSchedule`), so N steps + resume + N steps gives the same weights as 2N steps
straight. Under ``torchrun`` every rank draws the same global batch, timesteps and noise and
trains on its own slice of them, so the run matches one process. Images are read step by step
through a ``DataLoader`` (each rank reads only its slice), so a dataset need not fit in memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from diffusion_core.augment import apply_symmetries, draw_symmetries
from diffusion_core.batches import BatchSchedule, TrainData, step_loader
from diffusion_core.config import RunConfig
from diffusion_core.distributed import (
    init_distributed,
    leave_distributed,
    rank_and_world,
    resolve_device,
    unwrapped,
)
from diffusion_core.ema import EMA
from diffusion_core.losses import DiffusionLoss, TimestepDensity, draw_noise, timestep_density
from diffusion_core.model import (
    ModelCard,
    latest_checkpoint,
    read_state,
    read_weights,
    write_checkpoint,
)
from diffusion_core.parameterization import Cond, Prediction, prediction_for
from diffusion_core.schedules import NoiseSchedule
from diffusion_core.text import (
    PromptTable,
    encoder_record,
    load_text_encoder,
    resolve_context_dim,
)
from diffusion_core.unet import UNet, channels_last_format

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable checkpoint)."""


@dataclass(frozen=True)
class InitWeights:
    """A warm start: the EMA weights of another model (``weights``, a safetensors file, with its
    ``sha256``) and that model's card; ``source`` names it in messages (``models:/name/3``)."""

    weights: Path
    card: ModelCard
    sha256: str
    source: str


# ----------------------------------------------------------------------------------------------
# One optimisation step, shared by the trainer and the throughput benchmark.


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """Forward, loss, backward, clip, optimizer and EMA update for one (local) batch."""

    def __init__(
        self,
        net: Callable[[Tensor, Tensor, Cond | None], Tensor],
        schedule: NoiseSchedule,
        prediction: Prediction,
        optimizer: torch.optim.Optimizer,
        *,
        precision: str = "bf16",
        grad_clip: float | None = 1.0,
        ema: EMA | None = None,
        min_snr_gamma: float | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        density: TimestepDensity | None = None,
    ) -> None:
        self.net, self.optimizer, self.ema = net, optimizer, ema
        self.loss_fn = DiffusionLoss(schedule, prediction, min_snr_gamma=min_snr_gamma)
        self.precision, self.grad_clip, self.lr_scheduler = precision, grad_clip, lr_scheduler
        self.num_steps, self.density = schedule.num_steps, density
        self.step = 0

    def __call__(
        self,
        x0: Tensor,
        cond: Cond | None,
        *,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if t is None or eps is None:
            t, eps = draw_noise(
                x0.shape,
                self.num_steps,
                generator=generator or _default_gen(x0),
                device=x0.device,
                density=self.density,
            )
        with autocast(x0.device, self.precision):
            loss = self.loss_fn(self.net, x0, cond, t, eps).mean()
        if not torch.isfinite(loss):  # before the update, so the weights stay usable
            raise TrainingError(
                f"loss is {float(loss.detach())} at step {self.step}; "
                "lower train.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(unwrapped(self.net), self.step)
        self.step += 1
        return loss.detach()


def _default_gen(x: Tensor) -> torch.Generator:
    return torch.Generator(device=x.device).manual_seed(0)


# ----------------------------------------------------------------------------------------------
# The training loop.


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    steps: int  # steps this call ran (0 when the checkpoint was already complete)
    history: list[dict[str, float]]
    images_per_second: float
    card: ModelCard


def _slice_cond(cond: Cond | None, part: slice) -> Cond | None:
    """This rank's share of a global batch's conditioning."""
    if cond is None:
        return None

    def cut(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[part]

    return Cond(cut(cond.labels), cut(cond.context), cut(cond.pooled))


def _prompt_table(
    cfg: RunConfig, dataset: TrainData, device: torch.device
) -> tuple[PromptTable, dict[str, Any], RunConfig]:
    """The dataset's captions encoded once, the encoder's record and the config with
    ``model.context_dim`` set to the encoder's width."""
    tc = cfg.text
    assert tc is not None
    if dataset.captions is None:
        raise ValueError(f"{dataset.source}: text conditioning (text:) needs captions")
    clip = load_text_encoder(tc)
    width = resolve_context_dim(cfg.model.context_dim, clip, tc)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"context_dim": width})})
    table = PromptTable.build(clip, dataset.captions, use_pooled=tc.use_pooled)
    log.info("encoded %d distinct captions with %s", len(table.tokens) - 1, clip.name)
    return table.to(device), encoder_record(clip, tc), cfg


def lr_lambda(
    warmup_steps: int, steps: int, decay: str = "none", final: float = 0.0
) -> Callable[[int], float]:
    """The learning rate of step ``step`` (counted from 0) as a fraction of ``train.lr``: a
    linear warm-up over ``warmup_steps``, then constant (``none``) or falling along a half cosine
    or a line to ``final`` at the last step, ``steps - 1``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "none" or steps - 1 <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (steps - 1 - warmup_steps))
        if decay == "cosine":
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return final + (1.0 - final) * (1.0 - progress)

    return f


def training_layout(net: nn.Module, device: torch.device, precision: str) -> torch.memory_format:
    """The memory format the trainer keeps ``net`` in: channels-last (NDHWC) for our 3-D U-Net
    on a CPU in fp32, where oneDNN's channels-last 3-D convolutions made the volume config's
    training step 1.4x faster (bench/README.md); contiguous elsewhere (2-D: within noise; bf16
    and GPUs: not measured). Checkpoints are written contiguous either way."""
    if isinstance(net, UNet) and net.dims == 3 and device.type == "cpu" and precision == "fp32":
        return channels_last_format(net)
    return torch.contiguous_format


def model_card(cfg: RunConfig, dataset: TrainData, text_record: dict[str, Any] | None) -> ModelCard:
    """The card of a model trained with ``cfg`` on ``dataset`` (its sampling: ``cfg.sample``'s)."""
    conditional = cfg.model.class_conditional and dataset.labels is not None
    shape = dataset.item_shape
    return ModelCard(
        model=cfg.model,
        diffusion=cfg.diffusion,
        text=cfg.text,
        sampling=cfg.sample.defaults(),
        in_channels=shape[0],
        image_size=shape[-1],
        class_names=tuple(dataset.class_names),
        num_classes=len(dataset.class_names) if conditional else None,
        dataset_sha256=dataset.sha256(),
        text_encoder=text_record,
    )


def train(
    cfg: RunConfig,
    dataset: TrainData,
    out_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    init: InitWeights | None = None,
) -> TrainResult:
    """Train (or resume) ``cfg`` on ``dataset``; checkpoints go under ``out_dir/checkpoints``.

    A checkpoint there resumes only when it was trained with the same training identity (model,
    diffusion, text, train and the dataset's content: ``RunConfig.training_identity``); sampling,
    safety, evaluation and pipeline settings never enter it. ``max_steps`` stops at that global
    step (the run can be resumed later up to ``train.steps``). ``device`` defaults to
    ``runtime.device``; under ``torchrun`` the ranks join a process group, which is left at the
    end. ``on_checkpoint(path)`` runs on rank 0 after every checkpoint is written. ``init``
    starts the weights (and the EMA) from another model's EMA weights; its card must describe
    the same network and classes, and its weights enter the training identity.
    """
    # Long function: the one training loop, read top to bottom in commented blocks (as EDM's).
    tc = cfg.train
    device = resolve_device(device if device is not None else cfg.runtime.device)
    distributed = init_distributed(device)
    rank, world = rank_and_world()
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by {world} processes")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if len(dataset) < tc.batch_size:
        raise ValueError(
            f"dataset has {len(dataset)} images, fewer than train.batch_size={tc.batch_size}"
        )

    # Encode every distinct caption once with the frozen text encoder.
    prompt_table, text_record = None, None
    if cfg.text is not None:
        prompt_table, text_record, cfg = _prompt_table(cfg, dataset, device)

    # Build the network, optimizer and state.
    card = model_card(cfg, dataset, text_record)
    identity = cfg.training_identity(card.dataset_sha256, init.sha256 if init else None)
    torch.manual_seed(tc.seed)
    net = card.build()
    if init is not None:  # warm start: the EMA below starts from these weights too
        differ = card.differences(init.card)
        if differ:
            raise TrainingError(
                f"train.init_from: {init.source} is another network; its model card differs in "
                f"{', '.join(differ)}"
            )
        net.load_state_dict(read_weights(init.weights))
        log.info("starting from the weights of %s", init.source)
    net = net.to(device).to(memory_format=training_layout(net, device, tc.precision))
    ema = EMA(net, decay=tc.ema_decay, warmup=tc.ema_warmup, sigma_rel=tc.ema_sigma_rel)
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc.warmup_steps, tc.steps, tc.lr_decay, tc.lr_final)
    )
    model: Any = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None
        )
    if tc.compile:
        model = torch.compile(model)
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.num_steps)
    density = timestep_density(cfg.diffusion, schedule)
    step_fn = TrainStep(
        model,
        schedule,
        prediction_for(cfg.diffusion),
        optimizer,
        precision=tc.precision,
        grad_clip=tc.grad_clip,
        ema=ema,
        min_snr_gamma=cfg.diffusion.min_snr_gamma,
        lr_scheduler=lr_scheduler,
        density=density,
    )
    batches = BatchSchedule(len(dataset), tc.batch_size, tc.seed)
    gen = torch.Generator(device=device).manual_seed(tc.seed + 1)

    # Resume from the latest checkpoint when there is one.
    ckpt_root = Path(out_dir) / "checkpoints"
    history: list[dict[str, float]] = []
    resume_from = latest_checkpoint(ckpt_root)
    if resume_from is not None:
        state = read_state(resume_from / "state.pt")
        if state.get("training_identity") != identity:
            raise TrainingError(
                f"{resume_from} was trained with another model, diffusion, text or train setting "
                "or other data; use a new output directory"
            )
        net.load_state_dict(read_weights(resume_from / "weights.safetensors"))
        ema.load_state_dict(read_weights(resume_from / "ema.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step_fn.step = int(state["step"])
        history = [dict(h) for h in state["history"]]
        log.info("resumed from %s at step %d", resume_from, step_fn.step)

    labels = dataset.labels
    null_class = card.num_classes
    stop = tc.steps if max_steps is None else min(tc.steps, max_steps)
    start_step = step_fn.step
    bar = tqdm(total=tc.steps, initial=start_step, disable=not progress or rank != 0, unit="step")
    t_start, seen = time.perf_counter(), 0
    window_loss, window_t, window_n = 0.0, time.perf_counter(), 0
    checkpoint = resume_from
    global_shape = torch.Size((tc.batch_size, *dataset.item_shape))
    mine = slice(rank, None, world)

    def save() -> Path:
        state = {
            "step": step_fn.step,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "training_identity": identity,
        }
        path = write_checkpoint(
            ckpt_root,
            step_fn.step,
            card=card,
            weights=net.state_dict(),
            ema=ema.state_dict(),
            state=state,
            keep=tc.keep_checkpoints,
        )
        if on_checkpoint is not None:
            on_checkpoint(path)
        return path

    net.train()
    loader = step_loader(
        dataset, batches, range(start_step, stop), workers=tc.loader_workers, rank=rank, world=world
    )
    for local_images in loader:
        # Draw the global batch's timesteps, noise and label dropout; train on this rank's slice.
        idx = batches.indices(step_fn.step)
        x0 = local_images.to(device).float() / 127.5 - 1  # (B / world, C, H, W) in [-1, 1]
        t, eps = draw_noise(
            global_shape, schedule.num_steps, generator=gen, device=device, density=density
        )
        symmetries = draw_symmetries(
            tc.augment, tc.batch_size, len(global_shape) - 2, generator=gen, device=device
        )
        if symmetries is not None:
            x0 = apply_symmetries(x0, symmetries[0][mine], symmetries[1][mine])
        cond = None
        if null_class is not None:
            assert labels is not None
            y = labels[idx].to(device)
            drop = torch.rand(y.shape, generator=gen, device=device) < tc.label_dropout
            cond = Cond(labels=torch.where(drop, torch.full_like(y, null_class), y))
        if prompt_table is not None:
            assert cfg.text is not None
            rows = prompt_table.rows(idx, dropout=cfg.text.prompt_dropout, generator=gen)
            cond = prompt_table.cond(rows)
        loss = step_fn(x0, _slice_cond(cond, mine), t=t[mine], eps=eps[mine])

        # Log.
        loss_value = float(loss)
        seen += tc.batch_size
        window_loss, window_n = window_loss + loss_value, window_n + 1
        bar.update(1)
        if step_fn.step % tc.log_every == 0 or step_fn.step == stop:
            now = time.perf_counter()
            record = {
                "step": float(step_fn.step),
                "loss": window_loss / window_n,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_second": window_n * tc.batch_size / (now - window_t),
            }
            history.append(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_second']:.0f}"
            )
            if on_log is not None and rank == 0:
                on_log(record)
            if not progress and rank == 0:
                log.info(
                    "step %d/%d loss %.4f lr %.2e %.0f img/s",
                    step_fn.step,
                    tc.steps,
                    record["loss"],
                    record["lr"],
                    record["images_per_second"],
                )
            window_loss, window_t, window_n = 0.0, now, 0

        # Save a checkpoint.
        if rank == 0 and (step_fn.step % tc.checkpoint_every == 0 or step_fn.step == stop):
            checkpoint = save()
        if world > 1 and step_fn.step % tc.checkpoint_every == 0:
            dist.barrier()
    bar.close()
    if world > 1:
        dist.barrier()
    if distributed:
        leave_distributed()
    elapsed = time.perf_counter() - t_start
    if checkpoint is None:  # nothing to do: the run was already complete
        checkpoint = latest_checkpoint(ckpt_root) or save()
    return TrainResult(
        checkpoint=checkpoint,
        steps=step_fn.step - start_step,
        history=history,
        images_per_second=seen / elapsed if elapsed > 0 else 0.0,
        card=card,
    )
