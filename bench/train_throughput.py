"""Training throughput of the project's U-Net against diffusers' UNet2DModel on the same layout.

Both models run the same training step (the project's ``TrainStep`` when importable, else the
local ``train_step`` below): t ~ U{0..T-1}, eps ~ N(0, I), x_t from a linear schedule, forward,
eps-MSE, backward, gradient clipping at 1.0 and AdamW. Timed chunks alternate between the models
(and the matmul ceiling) so that load from other processes hits all of them alike; medians are
reported. Run from the repository root:

    python bench/train_throughput.py                      # 32x32x3, batch 32, bf16, CPU
    python bench/train_throughput.py --layout quickstart  # 16x16x1, 11 classes, batch 128
    python bench/train_throughput.py --layout cifar-ddpm  # DDPM CIFAR-10 layout, CUDA, batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_core.parameterization import PREDICTIONS, Cond
from diffusion_core.schedules import NoiseSchedule
from diffusion_core.unet import UNet, compile_unet, num_groups

NetFn = Callable[[Tensor, Tensor, Cond | None], Tensor]
StepFn = Callable[[Tensor, Cond | None], Tensor]


@dataclass(frozen=True)
class Layout:
    batch: int
    size: int
    in_channels: int
    channels: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    num_classes: int | None
    precision: str
    device: str


LAYOUTS: dict[str, Layout] = {
    "default": Layout(32, 32, 3, (64, 128, 128, 128), 2, (16,), 4, None, "bf16", "cpu"),
    "quickstart": Layout(128, 16, 1, (32, 64, 64), 1, (8,), 4, 11, "bf16", "cpu"),
    "cifar-ddpm": Layout(128, 32, 3, (128, 256, 256, 256), 2, (16,), 4, None, "bf16", "cuda"),
}


# ----------------------------------------------------------------------------------------------
# The models.


def build_ours(lay: Layout) -> UNet:
    base = lay.channels[0]
    if any(c % base for c in lay.channels):
        raise SystemExit(f"--channels must be multiples of the first one, got {lay.channels}")
    return UNet(
        in_channels=lay.in_channels,
        out_channels=lay.in_channels,
        image_size=lay.size,
        base_channels=base,
        channel_mults=tuple(c // base for c in lay.channels),
        num_res_blocks=lay.num_res_blocks,
        attention_resolutions=lay.attention_resolutions,
        num_heads=lay.num_heads,
        num_classes=lay.num_classes,
    )


def build_diffusers(lay: Layout, *, scale_shift: bool = False) -> nn.Module:
    """diffusers' UNet2DModel in ``lay``; ``scale_shift`` conditions its residual blocks on the
    time embedding by scale and shift (FiLM) as ours do, instead of adding a shift."""
    from diffusers import UNet2DModel

    res = [lay.size // 2**i for i in range(len(lay.channels))]
    attn = [r in lay.attention_resolutions for r in res]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    model = UNet2DModel(
        sample_size=lay.size,
        in_channels=lay.in_channels,
        out_channels=lay.in_channels,
        block_out_channels=lay.channels,
        layers_per_block=lay.num_res_blocks,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=lay.channels[-1] // lay.num_heads,
        norm_num_groups=num_groups(lay.channels[0]),
        attn_norm_num_groups=num_groups(lay.channels[0]),  # the middle block's too
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        num_class_embeds=None if lay.num_classes is None else lay.num_classes + 1,
    )
    return cast(nn.Module, model)


def diffusers_fn(model: nn.Module) -> NetFn:
    def fn(x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        labels = cond.labels if cond is not None else None
        return model(x, t, class_labels=labels).sample

    return fn


# ----------------------------------------------------------------------------------------------
# The training step.


def precision_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    net_fn: NetFn,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    x0: Tensor,
    cond: Cond | None,
    *,
    precision: str,
    grad_clip: float = 1.0,
) -> Tensor:
    """One eps-prediction step (Ho et al. 2020, Algorithm 1) with clipping and AdamW."""
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    x_t = schedule.q_sample(x0, t, eps)
    with precision_ctx(x0.device, precision):
        out = net_fn(x_t, t, cond)
    loss = F.mse_loss(out.float(), eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()


def make_step(
    net: nn.Module, net_fn: NetFn, lay: Layout, use_trainer: bool, *, fused: bool = False
) -> StepFn:
    """The training step of ``net``; ``fused`` takes AdamW's fused kernel (one per device)."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    if use_trainer:
        from diffusion_core.training import TrainStep

        step = TrainStep(
            net_fn, schedule, PREDICTIONS["eps"], optimizer, precision=lay.precision, grad_clip=1.0
        )
        gen = torch.Generator(device=lay.device).manual_seed(0)
        return lambda x0, cond: step(x0, cond, generator=gen)
    return lambda x0, cond: train_step(
        net_fn, params, optimizer, schedule, x0, cond, precision=lay.precision
    )


def trainer_available() -> bool:
    try:
        from diffusion_core.training import TrainStep  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Measurements.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_chunk(device: torch.device, precision: str, n: int = 2048, reps: int = 3) -> float:
    """GFLOP/s of an n^3 matmul in the working precision (the machine's practical ceiling)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        n, reps = 8192, 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flop_per_image(step: StepFn, x0: Tensor, cond: Cond | None) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(x0, cond)
    return counter.get_total_flops() / x0.shape[0]


def timed_chunk(step: StepFn, x0: Tensor, cond: Cond | None, steps: int) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second of this process over ``steps`` steps.

    CPU time is less sensitive than wall-clock time to other processes taking turns on the
    cores; on a shared machine compare both.
    """
    sync(x0.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(x0, cond)
    sync(x0.device)
    images = steps * x0.shape[0]
    return images / (time.perf_counter() - t0), images / (time.process_time() - c0)


@dataclass
class ModelResult:
    name: str
    params_m: float
    flop_per_img_g: float
    img_per_s: float
    img_per_s_runs: list[float]
    img_per_cpu_s: float
    utilisation: float
    compile_s: float | None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="default")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")))
    p.add_argument("--precision", choices=["bf16", "fp32"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="steps per timed chunk")
    p.add_argument("--repeats", type=int, default=7, help="timed chunks per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--compile", action="store_true", help="torch.compile our U-Net")
    p.add_argument("--compile-diffusers", action="store_true", help="torch.compile the peer too")
    p.add_argument(
        "--channels-last", action="store_true", help="ours: channels-last weights, input"
    )
    p.add_argument("--fused-adamw", action="store_true", help="ours: AdamW(fused=True)")
    p.add_argument("--no-diffusers", action="store_true", help="time only our U-Net")
    p.add_argument("--own-step", action="store_true", help="ignore TrainStep, use train_step")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)

    lay = LAYOUTS[args.layout]
    overrides = {
        "batch": args.batch,
        "size": args.size,
        "channels": args.channels,
        "precision": args.precision,
        "device": args.device,
    }
    lay = Layout(**{**asdict(lay), **{k: v for k, v in overrides.items() if v is not None}})
    device = torch.device(lay.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    steps = args.steps or (20 if device.type == "cuda" else 3)
    use_trainer = trainer_available() and not args.own_step
    step_code = "diffusion_core.training.TrainStep" if use_trainer else "bench train_step (local)"

    torch.manual_seed(0)
    x0 = torch.randn(lay.batch, lay.in_channels, lay.size, lay.size, device=device)
    cond = None
    if lay.num_classes is not None:
        labels = torch.randint(0, lay.num_classes + 1, (lay.batch,), device=device)
        cond = Cond(labels=labels)

    ours = build_ours(lay).to(device)
    inputs = {"ours": x0, "diffusers": x0}
    if args.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        inputs["ours"] = x0.contiguous(memory_format=torch.channels_last)
    models: dict[str, tuple[nn.Module, NetFn]] = {}
    compiled = {"ours": args.compile, "diffusers": args.compile_diffusers}
    compile_s: dict[str, float | None] = {"ours": None, "diffusers": None}
    ours_fn: nn.Module = compile_unet(ours) if args.compile else ours
    models["ours"] = (ours, ours_fn)
    if not args.no_diffusers:
        ref = build_diffusers(lay).to(device)
        models["diffusers"] = (
            ref,
            diffusers_fn(compile_unet(ref) if compiled["diffusers"] else ref),
        )

    fused = {"ours": args.fused_adamw, "diffusers": False}
    step_fns = {
        name: make_step(net, fn, lay, use_trainer, fused=fused[name])
        for name, (net, fn) in models.items()
    }
    flops = {}
    for name, step in step_fns.items():
        t0 = time.perf_counter()
        step(inputs[name], cond)  # includes compilation when compiled
        sync(device)
        if compiled[name]:
            compile_s[name] = time.perf_counter() - t0
            # count the eager model's FLOP: the same arithmetic
            net = models[name][0]
            eager = ours if name == "ours" else diffusers_fn(net)
            flops[name] = flop_per_image(make_step(net, eager, lay, use_trainer), x0, cond)
        else:
            flops[name] = flop_per_image(step, inputs[name], cond)
        for _ in range(args.warmup):
            step(inputs[name], cond)

    runs: dict[str, list[float]] = {name: [] for name in step_fns}
    cpu_runs: dict[str, list[float]] = {name: [] for name in step_fns}
    ceiling_runs: list[float] = []
    for r in range(args.repeats):
        ceiling_runs.append(matmul_chunk(device, lay.precision))
        order = list(step_fns) if r % 2 == 0 else list(reversed(step_fns))
        for name in order:
            wall, cpu = timed_chunk(step_fns[name], inputs[name], cond, steps)
            runs[name].append(wall)
            cpu_runs[name].append(cpu)
    ceiling = statistics.median(ceiling_runs)

    results = []
    for name, (net, _) in models.items():
        ips = statistics.median(runs[name])
        results.append(
            ModelResult(
                name=name,
                params_m=sum(q.numel() for q in net.parameters()) / 1e6,
                flop_per_img_g=flops[name] / 1e9,
                img_per_s=ips,
                img_per_s_runs=[round(v, 2) for v in runs[name]],
                img_per_cpu_s=statistics.median(cpu_runs[name]),
                utilisation=flops[name] * ips / (ceiling * 1e9),
                compile_s=compile_s[name],
            )
        )

    print(
        f"layout={args.layout} batch={lay.batch} size={lay.size}x{lay.size}x{lay.in_channels} "
        f"channels={lay.channels} res_blocks={lay.num_res_blocks} "
        f"attention={lay.attention_resolutions} classes={lay.num_classes} "
        f"precision={lay.precision} device={device} compile={args.compile} "
        f"compile_diffusers={args.compile_diffusers} channels_last={args.channels_last} "
        f"fused_adamw={args.fused_adamw}"
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}; step code: {step_code}"
    )
    print(
        f"{lay.precision} matmul ceiling: {ceiling:.0f} GFLOP/s (runs: "
        f"{', '.join(f'{c:.0f}' for c in ceiling_runs)})"
    )
    print(
        f"{'model':<10} {'params M':>9} {'GFLOP/img':>10} {'img/s':>8} {'img/CPU-s':>9} "
        f"{'util':>6}  runs"
    )
    for res in results:
        print(
            f"{res.name:<10} {res.params_m:>9.2f} {res.flop_per_img_g:>10.2f} "
            f"{res.img_per_s:>8.2f} {res.img_per_cpu_s:>9.2f} {res.utilisation:>6.1%}  "
            f"{res.img_per_s_runs}"
            + (f"  (compile {res.compile_s:.0f} s)" if res.compile_s else "")
        )
    ratio = cpu_ratio = None
    if "diffusers" in runs:
        ratios = [a / b for a, b in zip(runs["ours"], runs["diffusers"], strict=True)]
        ratio = results[0].img_per_s / results[1].img_per_s
        cpu_ratio = results[0].img_per_cpu_s / results[1].img_per_cpu_s
        print(
            f"ratio ours/diffusers: {ratio:.2f} (wall-clock; median of per-repeat ratios "
            f"{statistics.median(ratios):.2f}, per CPU second {cpu_ratio:.2f})"
        )

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "layout": args.layout,
        "config": asdict(lay),
        "compile": args.compile,
        "compile_diffusers": args.compile_diffusers,
        "channels_last": args.channels_last,
        "fused_adamw": args.fused_adamw,
        "step_code": step_code,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor(),
        "ceiling_gflops": ceiling,
        "ceiling_runs": ceiling_runs,
        "models": [asdict(r) for r in results],
        "ratio_ours_over_diffusers": ratio,
        "ratio_per_cpu_second": cpu_ratio,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
