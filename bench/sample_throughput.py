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
import copy
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

from train_throughput import LAYOUTS, Layout, build_diffusers, flop_per_image, matmul_chunk, sync

from diffusion_core.config import DiffusionConfig, ModelConfig
from diffusion_core.distributed import autocast
from diffusion_core.model import ModelCard
from diffusion_core.parameterization import Cond
from diffusion_core.samplers import run_sampler
from diffusion_core.sampling import (
    SampleRequest,
    _initial_noise,
    balanced_labels,
    class_denoiser,
    generate,
    prefers_channels_last,
    to_uint8,
)
from diffusion_core.schedules import NoiseSchedule, timestep_grid
from diffusion_core.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample

# Our sampler -> (diffusers scheduler class name, the spacing diffusers uses by default).
PEERS = {
    "ddim": ("DDIMScheduler", "leading"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", "linspace"),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PORT_ATOL = 1e-4  # fp32 network outputs of ours and the ported peer; measured ~1e-6
Images = Callable[[], tuple[Tensor, Tensor | None]]  # (uint8 images, float samples or None)


# ----------------------------------------------------------------------------------------------
# The two networks, with the same weights.


def card_for(lay: Layout) -> ModelCard:
    """The model card of ``lay``: what the pipeline would build and sample."""
    base = lay.channels[0]
    model = ModelConfig(
        base_channels=base,
        channel_mults=tuple(c // base for c in lay.channels),
        num_res_blocks=lay.num_res_blocks,
        attention_resolutions=lay.attention_resolutions,
        num_heads=lay.num_heads,
        class_conditional=True,
    )
    return ModelCard(
        model=model,
        diffusion=DiffusionConfig(schedule="linear", num_steps=1000, prediction="eps"),
        in_channels=lay.in_channels,
        image_size=lay.size,
        num_classes=lay.num_classes,
        dataset_sha256="bench",
    )


def port_weights(ours: UNet, peer: nn.Module) -> None:
    """Copy our weights into diffusers' scale-shift UNet2DModel so both compute one function.

    Each of our residual blocks' slice of the shared FiLM projection becomes that block's
    ``time_emb_proj``; the fused qkv splits into ``to_q``, ``to_k``, ``to_v``; the peer's second
    GroupNorm gets the identity affine ours folds into the FiLM. Our GroupNorms take the peer's
    group counts (the same arithmetic cost; they differ at 64 channels in the quickstart layout).
    """
    p: Any = peer
    blocks = [*p.down_blocks, p.mid_block, *p.up_blocks]  # execution order
    peer_of: dict[type, list[nn.Module]] = {
        ResBlock: [r for b in blocks for r in b.resnets],
        AttentionBlock: [a for b in blocks for a in getattr(b, "attentions", None) or []],
        Downsample: [s for b in p.down_blocks for s in getattr(b, "downsamplers", None) or []],
        Upsample: [s for b in p.up_blocks for s in getattr(b, "upsamplers", None) or []],
    }
    pairs: list[tuple[nn.Module, nn.Module]] = [
        (ours.conv_in, p.conv_in),
        (ours.time_mlp[0], p.time_embedding.linear_1),
        (ours.time_mlp[2], p.time_embedding.linear_2),
        (ours.norm_out, p.conv_norm_out),
        (ours.conv_out, p.conv_out),
    ]
    if ours.class_embed is not None:
        pairs.append((ours.class_embed, p.class_embedding))
    for kind, theirs in peer_of.items():
        pairs += zip([m for m in ours.modules() if isinstance(m, kind)], theirs, strict=True)
    film_w = ours.film.weight.split(ours.film_sizes)
    film_b = ours.film.bias.split(ours.film_sizes)
    res_index = 0
    with torch.no_grad():
        for mine, their in pairs:
            if isinstance(mine, ResBlock):
                for a, b in [(mine.norm1, their.norm1), (mine.conv1, their.conv1)]:
                    b.load_state_dict(a.state_dict())
                their.conv2.load_state_dict(mine.conv2.state_dict())
                if isinstance(mine.skip, nn.Conv2d):
                    their.conv_shortcut.load_state_dict(mine.skip.state_dict())
                their.norm2.weight.fill_(1.0)
                their.norm2.bias.zero_()
                mine.norm1.num_groups = their.norm1.num_groups
                mine.norm2.num_groups = their.norm2.num_groups
                their.time_emb_proj.weight.copy_(film_w[res_index])
                their.time_emb_proj.bias.copy_(film_b[res_index])
                res_index += 1
            elif isinstance(mine, AttentionBlock):
                mine.norm.num_groups = their.group_norm.num_groups
                their.group_norm.load_state_dict(mine.norm.state_dict())
                for part, w, b in zip(
                    (their.to_q, their.to_k, their.to_v),
                    mine.qkv.weight.chunk(3),
                    mine.qkv.bias.chunk(3),
                    strict=True,
                ):
                    part.weight.copy_(w)
                    part.bias.copy_(b)
                their.to_out[0].load_state_dict(mine.proj.state_dict())
            elif isinstance(mine, Downsample | Upsample):
                their.conv.load_state_dict(mine.conv.state_dict())
            else:
                their.load_state_dict(mine.state_dict())
                if isinstance(mine, nn.GroupNorm):
                    mine.num_groups = their.num_groups


def check_port(ours: UNet, peer: nn.Module, lay: Layout, device: torch.device) -> float:
    """Max abs difference of the two networks' fp32 outputs on random input; exits above
    PORT_ATOL (the peer would not be doing our work)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, lay.in_channels, lay.size, lay.size, generator=g).to(device)
    t = torch.tensor([0, 250, 600, 999], device=device)
    labels = torch.tensor([0, 1, 2, lay.num_classes or 0], device=device)
    with torch.no_grad():
        diff = (ours(x, t, Cond(labels=labels)) - peer(x, t, class_labels=labels).sample).abs()
    if float(diff.max()) > PORT_ATOL:
        raise SystemExit(f"ported peer differs from ours by {float(diff.max()):.2e} > {PORT_ATOL}")
    return float(diff.max())


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
    the graph as constants (inductor's freezing: inference only)."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    if not args.freeze:
        return torch.compile(net, mode=mode)
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
    p.add_argument("--compile", action="store_true", help="torch.compile our U-Net")
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
    )
    p.add_argument("--freeze", action="store_true", help="with --compile: inductor freezing")
    p.add_argument("--channels-last", action="store_true", help="our U-Net in channels-last")
    p.add_argument("--compile-peer", action="store_true", help="also time diffusers compiled")
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

    # Build ours from the card, port its (random) weights into the peer and check parity.
    torch.manual_seed(0)
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
    laid_out = args.channels_last or prefers_channels_last(net, dtype)
    fast_net = copy.deepcopy(net).to(memory_format=torch.channels_last) if laid_out else net
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
        compile_s = time.perf_counter() - t0 if args.compile else None
        eager_x0 = ours_float(net, card, request, x_T, dtype) if fast_path else fast_x0
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
            "sample_abs_max": float(eager_x0.abs().max()),
            "compile_s": compile_s,
        }
        results[name] = entry
        report_sampler(name, args, entry)

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
    print(
        f"max abs difference of the images in [-1, 1], fast vs eager path (same seeds): "
        f"{e['max_abs_fast_vs_eager']:.2e}; ours vs diffusers: "
        f"{e['max_abs_ours_vs_diffusers']:.2e} (samples reach |x| = {e['sample_abs_max']:.1f})"
    )


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
