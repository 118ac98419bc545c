"""Sampling throughput of the pipeline's sample path against diffusers' schedulers.

Ours: ``diffusion_core.sampling.generate``, the function the pipeline's sample step calls (noise
drawn per sample, class-balanced labels, classifier-free guidance as one network call on the
concatenated conditional and unconditional batch, the sampler from the registry, uint8 images).
The peer: diffusers' ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` driving a
``UNet2DModel`` of the same layout, guidance done as diffusers' pipelines do it ([uncond, cond]
concatenated, one call, chunk, combine), uint8 images. Our U-Net's weights are ported into the
peer (its residual blocks built with scale-shift conditioning, like ours), both start from the
same x_T and labels, so both do the same work and their samples agree to float rounding: the
script checks that. x0 clipping is off on both sides (diffusers' DPM-Solver has none).

Timed runs alternate between the contestants; medians are reported, with images per CPU second
of this process beside wall-clock img/s (less sensitive to other processes on a shared machine).
The fast path (the network laid out as ``generate`` lays it out: channels-last for our 2-D U-Net
on a CPU in fp32; ``--compile``, ``--channels-last``) is checked against the eager path on the same
seeds: the max abs difference of the final samples in [-1, 1] is printed.

    python bench/sample_throughput.py                                  # quickstart, CPU, fp32
    python bench/sample_throughput.py --dtype bf16 --batch 128
    python bench/sample_throughput.py --compile --freeze               # inductor, frozen weights
    python bench/sample_throughput.py --layout cifar-ddpm --device cuda --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_port import card_for, check_port, layout_of, port_weights
from train_throughput import LAYOUTS, build_diffusers, flop_per_image, matmul_chunk, sync

from diffusion_core.distributed import autocast
from diffusion_core.model import ModelCard, load_model
from diffusion_core.parameterization import Cond
from diffusion_core.samplers import run_sampler
from diffusion_core.sampling import (
    SampleRequest,
    _initial_noise,
    balanced_labels,
    class_denoiser,
    generate,
    sampling_network,
    to_uint8,
)
from diffusion_core.schedules import NoiseSchedule, timestep_grid
from diffusion_core.unet import CompiledForInference

# Our sampler -> (diffusers scheduler class name, the spacing diffusers uses by default).
PEERS = {
    "ddim": ("DDIMScheduler", "leading"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", "linspace"),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
Images = Callable[[], tuple[Tensor, Tensor | None]]  # (uint8 images, float samples or None)


# ----------------------------------------------------------------------------------------------
# Sampling, each side its own way.


def peer_scheduler(name: str) -> Any:
    import diffusers

    cls = getattr(diffusers, PEERS[name][0])
    kw: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    if name == "ddim":
        kw |= {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "leading"}
    else:
        kw |= {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}
    return cls(**kw)


def peer_sample(
    peer: nn.Module,
    scheduler: Any,
    steps: int,
    x_T: Tensor,
    labels: Tensor,
    *,
    null: int,
    scale: float,
    dtype: torch.dtype | None,
) -> Tensor:
    """A diffusers pipeline's guided loop (as in its class-conditional pipelines)."""
    scheduler.set_timesteps(steps, device=x_T.device)  # also resets the multistep history
    class_in = torch.cat([torch.full_like(labels, null), labels])  # [uncond, cond]
    latents = x_T * scheduler.init_noise_sigma
    with torch.no_grad(), autocast(x_T.device, dtype):
        for t in scheduler.timesteps:
            latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = peer(latent_in, t, class_labels=class_in).sample
            uncond, cond = noise.chunk(2)
            noise = uncond + scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
    return latents.float()


def ours_float(
    net: nn.Module,
    card: ModelCard,
    request: SampleRequest,
    x_T: Tensor,
    dtype: torch.dtype | None,
) -> Tensor:
    """The final samples in [-1, 1] of what ``generate`` draws for ``request`` (its first batch,
    before the uint8 step): the sampler functions called as the sample step calls them."""
    knobs = request.knobs(card)
    schedule = NoiseSchedule.from_name(card.diffusion.schedule, card.diffusion.num_steps)
    grid = timestep_grid(schedule.num_steps, knobs.steps, spacing=knobs.spacing)
    labels = balanced_labels(len(x_T), card.num_classes or 1).to(x_T.device)
    with torch.no_grad(), autocast(x_T.device, dtype):
        return run_sampler(
            knobs.sampler, class_denoiser(net, card, knobs, labels), x_T, grid, schedule
        ).float()


def image_diff(a: Tensor, b: Tensor) -> float:
    """Max abs difference of two batches of samples as images (clamped to [-1, 1], as the
    uint8 step does): random weights and no x0 clipping let samples leave that range, where
    rounding differences grow with them."""
    return float((a.clamp(-1, 1) - b.clamp(-1, 1)).abs().max())


def compiled(net: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``torch.compile`` of ``net`` in ``--compile-mode``; ``--freeze`` folds the weights into
    the graph as constants (inductor's freezing: inference only). ``--freeze`` in the default
    mode is what the pipeline's ``runtime.compile`` samples with (``CompiledForInference``)."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    if not args.freeze:
        return torch.compile(net, mode=mode)
    if mode is None:
        return CompiledForInference(net)
    from torch._inductor import list_mode_options

    return torch.compile(net, options={**list_mode_options(mode or "default"), "freezing": True})


# ----------------------------------------------------------------------------------------------
# The run.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--layout", choices=["quickstart", "cifar-ddpm", "default"], default="quickstart"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, help="samples per batch (the network sees 2x)")
    p.add_argument("--samplers", default="ddim,dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--repeats", type=int, help="timed runs per contestant (CPU 3, CUDA 5)")
    p.add_argument(
        "--call-repeats",
        type=int,
        default=0,
        help="also time this many single guided network calls per network, interleaved",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile our U-Net")
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
    )
    p.add_argument("--freeze", action="store_true", help="with --compile: inductor freezing")
    p.add_argument("--channels-last", action="store_true", help="our U-Net in channels-last")
    p.add_argument("--compile-peer", action="store_true", help="also time diffusers compiled")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint folder (its card's layout)")
    p.add_argument("--json-out", type=Path, help="write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # Long function: the run reads top to bottom (build, port, warm up and check, time, report).
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    lay = LAYOUTS[args.layout]
    batch = args.batch or (1024 if device.type == "cuda" else 256)
    # Guidance needs classes: an unconditional layout gets CIFAR-10's ten (one embedding row each).
    lay = replace(lay, batch=batch, device=args.device, num_classes=lay.num_classes or 10)
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (5 if device.type == "cuda" else 3)

    # Ours from a checkpoint or the layout (random weights), ported into the peer, checked.
    torch.manual_seed(0)
    if args.checkpoint:
        net, card = load_model(args.checkpoint)
        lay = layout_of(card, lay)
    else:
        card = card_for(lay)
        net = card.build()
        net.conv_out.reset_parameters()  # zero-initialised for training: samples would be flat
    peer = build_diffusers(lay, scale_shift=True)
    port_weights(net, peer)
    net, peer = net.to(device).eval(), peer.to(device).eval()
    port_diff = check_port(net, peer, lay, device)

    # Ours as the pipeline samples it: generate lays the network out (channels-last where
    # prefers_channels_last says so; --channels-last forces it); --compile compiles that layout.
    # "ours eager" is the plain network in its own layout, the reference for the differences.
    fast_net = sampling_network(net, dtype, channels_last=args.channels_last or None)
    laid_out = fast_net is not net
    if args.compile:
        fast_net = compiled(fast_net, args)
    fast_path = laid_out or args.compile
    layout = False if args.compile else (True if args.channels_last else None)
    peer_fast = compiled(peer, args) if args.compile_peer else peer

    # FLOP per sample and step: one guided network call (2 images) on the eager network.
    x2 = torch.randn(2 * batch, lay.in_channels, lay.size, lay.size, device=device)
    t2 = torch.full((2 * batch,), 500, device=device)
    c2 = Cond(labels=torch.zeros(2 * batch, dtype=torch.long, device=device))
    with torch.no_grad(), autocast(device, dtype):
        flop_step = 2 * flop_per_image(lambda x, c: net(x, t2, c), x2, c2)

    results: dict[str, Any] = {}
    for name in args.samplers.split(","):
        if name not in PEERS:
            raise SystemExit(f"--samplers: unknown {name!r}; choose from {sorted(PEERS)}")
        request = SampleRequest(
            sampler=name,
            steps=args.steps,
            spacing=PEERS[name][1],
            guidance_scale=args.guidance,
            clip_x0=False,
            num_samples=batch,
            batch_size=batch,
        )
        seeds = request.seed * 1_000_000 + torch.arange(batch)
        x_T = _initial_noise(seeds, card.sample_shape, device)
        labels = balanced_labels(batch, lay.num_classes).to(device)
        scheduler = peer_scheduler(name)

        def ours_run(m: nn.Module, cl: bool | None, request: SampleRequest = request) -> Images:
            return lambda: (generate(m, card, request, dtype=dtype, channels_last=cl).images, None)

        def peer_run(
            m: nn.Module, scheduler: Any = scheduler, x_T: Tensor = x_T, labels: Tensor = labels
        ) -> Images:
            def run() -> tuple[Tensor, Tensor]:
                x0 = peer_sample(
                    m,
                    scheduler,
                    args.steps,
                    x_T,
                    labels,
                    null=lay.num_classes,
                    scale=args.guidance,
                    dtype=dtype,
                )
                return to_uint8(x0).cpu(), x0

            return run

        runs: dict[str, Images] = {"ours": ours_run(fast_net if args.compile else net, layout)}
        if fast_path:
            runs["ours eager"] = ours_run(net, False)
        runs["diffusers"] = peer_run(peer)
        if args.compile_peer:
            runs["diffusers compiled"] = peer_run(peer_fast)

        # Warm-up (compilation included) and the checks: fast vs eager, ours vs diffusers.
        t0 = time.perf_counter()
        fast_x0 = ours_float(fast_net, card, request, x_T, dtype)
        sync(device)
        # The graph is compiled in the first sampler's warm-up; later samplers reuse it.
        compile_s = time.perf_counter() - t0 if args.compile and not results else None
        eager_x0 = ours_float(net, card, request, x_T, dtype) if fast_path else fast_x0
        fp32_x0 = ours_float(net, card, request, x_T, None) if dtype is not None else eager_x0
        _, peer_x0 = runs["diffusers"]()
        for key in runs:
            if "compiled" in key or (key == "ours" and args.compile):
                runs[key]()  # warm compiled paths once more (generate re-enters the graph)

        # Timed runs, interleaved.
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        ceiling_runs = []
        for r in range(repeats):
            ceiling_runs.append(matmul_chunk(device, args.dtype))
            for key in runs if r % 2 == 0 else reversed(runs):
                sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                runs[key]()
                sync(device)
                wall[key].append(batch / (time.perf_counter() - w0))
                cpu[key].append(batch / (time.process_time() - c0))
        ceiling = statistics.median(ceiling_runs)
        img_s = {k: statistics.median(v) for k, v in wall.items()}
        entry = {
            "img_per_s": img_s,
            "img_per_s_runs": {k: [round(x, 2) for x in v] for k, v in wall.items()},
            "img_per_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
            "gflop_per_img": flop_step * args.steps / 1e9,
            "utilisation": {
                k: flop_step * args.steps * v / (ceiling * 1e9) for k, v in img_s.items()
            },
            "ceiling_gflops": ceiling,
            "ratio": img_s["ours"] / img_s["diffusers"],
            "ratio_per_cpu_s": statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"]),
            "ratio_vs_compiled_peer": img_s["ours"] / img_s["diffusers compiled"]
            if "diffusers compiled" in img_s
            else None,
            "ratio_fast_over_eager": img_s["ours"] / img_s["ours eager"] if fast_path else None,
            "max_abs_fast_vs_eager": image_diff(fast_x0, eager_x0),
            "max_abs_ours_vs_diffusers": image_diff(eager_x0, peer_x0),
            "max_abs_vs_fp32": image_diff(eager_x0, fp32_x0) if dtype is not None else None,
            "sample_abs_max": float(eager_x0.abs().max()),
            "compile_s": compile_s,
        }
        if compile_s is not None and fast_path and img_s["ours"] > img_s["ours eager"]:
            # The compile's own time (the first call less what the call costs compiled), and
            # the guided image-steps (samples x steps) after which the faster steps repay it.
            own = compile_s - batch / img_s["ours"]
            saved = 1 / (img_s["ours eager"] * args.steps) - 1 / (img_s["ours"] * args.steps)
            entry["compile_own_s"] = own
            entry["break_even_image_steps"] = own / saved
        results[name] = entry
        report_sampler(name, args, entry)

    calls = None
    if args.call_repeats:
        nets = {
            "ours": fast_net,
            "ours eager": net,
            "diffusers": lambda x, t, c: peer(x, t, class_labels=c.labels).sample,
        }
        if args.compile_peer:
            nets["diffusers compiled"] = lambda x, t, c: peer_fast(x, t, class_labels=c.labels)
        calls = time_calls(nets, x2, t2, c2, dtype, args.call_repeats)
        print(
            f"\none guided network call ({2 * batch} images), median of {args.call_repeats}: "
            + ", ".join(f"{k} {v:.1f} img/s" for k, v in calls["img_per_s"].items())
        )
        print(
            f"network call ratio ours/diffusers: {calls['ratio']:.2f} (median of per-repeat "
            f"ratios; per CPU second {calls['ratio_per_cpu_s']:.2f})"
        )

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "layout": args.layout,
        "config": asdict(lay),
        "dtype": args.dtype,
        "steps": args.steps,
        "guidance": args.guidance,
        "repeats": repeats,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "freeze": args.freeze,
        "channels_last": laid_out,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "params_m": {
            "ours": sum(q.numel() for q in net.parameters()) / 1e6,
            "diffusers": sum(q.numel() for q in peer.parameters()) / 1e6,
        },
        "port_max_abs": port_diff,
        "samplers": results,
        "network_calls": calls,
    }
    print(
        f"layout={args.layout} batch={batch} (network batch {2 * batch}) dtype={args.dtype} "
        f"device={report['device_name']} torch {torch.__version__} threads "
        f"{report['threads']}; params ours {report['params_m']['ours']:.2f}M, diffusers "
        f"{report['params_m']['diffusers']:.2f}M; ported network max abs diff {port_diff:.1e}"
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
    return report


def time_calls(
    nets: dict[str, Callable[..., Any]],
    x: Tensor,
    t: Tensor,
    cond: Cond,
    dtype: torch.dtype | None,
    repeats: int,
) -> dict[str, Any]:
    """Images per second of one guided network call of each network, interleaved repeats; the
    input is laid out as ``generate`` hands it over (a compiled graph is not traced again)."""
    wall: dict[str, list[float]] = {k: [] for k in nets}
    cpu: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad(), autocast(x.device, dtype):
        for r in range(repeats + 1):  # the first round warms up
            for key in nets if r % 2 == 0 else reversed(nets):
                sync(x.device)
                w0, c0 = time.perf_counter(), time.process_time()
                nets[key](x, t, cond)
                sync(x.device)
                if r:
                    wall[key].append(len(x) / (time.perf_counter() - w0))
                    cpu[key].append(len(x) / (time.process_time() - c0))
    ratios = [a / b for a, b in zip(wall["ours"], wall["diffusers"], strict=True)]
    cpu_ratios = [a / b for a, b in zip(cpu["ours"], cpu["diffusers"], strict=True)]
    return {
        "img_per_s": {k: statistics.median(v) for k, v in wall.items()},
        "img_per_s_runs": {k: [round(v, 1) for v in vs] for k, vs in wall.items()},
        "ratio": statistics.median(ratios),
        "ratio_per_cpu_s": statistics.median(cpu_ratios),
    }


def report_sampler(name: str, args: argparse.Namespace, e: dict[str, Any]) -> None:
    print(
        f"\n{name} {args.steps} steps, guidance {args.guidance}: {e['gflop_per_img']:.2f} "
        f"GFLOP/img, {args.dtype} matmul ceiling {e['ceiling_gflops']:.0f} GFLOP/s"
        + (f", compile {e['compile_s']:.0f} s" if e["compile_s"] else "")
    )
    print(f"{'contestant':<20}{'img/s':>9}{'img/CPU-s':>11}{'util':>8}  runs")
    for k, v in e["img_per_s"].items():
        print(
            f"{k:<20}{v:>9.2f}{e['img_per_cpu_s'][k]:>11.2f}{e['utilisation'][k]:>8.1%}  "
            f"{e['img_per_s_runs'][k]}"
        )
    print(f"ratio ours/diffusers: {e['ratio']:.2f} (per CPU second {e['ratio_per_cpu_s']:.2f})")
    if e["ratio_vs_compiled_peer"] is not None:
        print(f"ratio ours/diffusers compiled: {e['ratio_vs_compiled_peer']:.2f}")
    if e["ratio_fast_over_eager"] is not None:
        print(f"ratio ours fast/ours eager: {e['ratio_fast_over_eager']:.2f}")
    if "break_even_image_steps" in e:
        print(
            f"compile: {e['compile_own_s']:.0f} s of its own, repaid after "
            f"{e['break_even_image_steps']:,.0f} guided image-steps (samples x steps) in one call"
        )
    print(
        f"max abs difference of the images in [-1, 1], fast vs eager path (same seeds): "
        f"{e['max_abs_fast_vs_eager']:.2e}; ours vs diffusers: "
        f"{e['max_abs_ours_vs_diffusers']:.2e} (samples reach |x| = {e['sample_abs_max']:.1f})"
    )
    if e["max_abs_vs_fp32"] is not None:
        print(f"max abs difference of the images, {args.dtype} vs fp32: {e['max_abs_vs_fp32']:.2e}")


def cpu_name() -> str:
    """The CPU's model name and the flags that decide bf16 speed (avx512_bf16, amx_bf16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(bf16) or 'no bf16 instructions'})"


if __name__ == "__main__":
    main()
