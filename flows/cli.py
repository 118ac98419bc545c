"""The ``diffpipe`` command: the one place where errors become messages and exit codes.

Exit codes: 0 success, 1 a run that failed, 2 bad input (config, paths, arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2

log = logging.getLogger("diffpipe")


class UsageError(ValueError):
    """Bad command-line input."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``train.steps=100`` style overrides; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _load(args: argparse.Namespace) -> Any:
    from diffusion_core.config import load_config

    return load_config(args.config, parse_overrides(args.set or []))


def _parse_labels(text: str | None) -> Any:
    if text is None:
        return None
    import torch

    try:
        return torch.tensor([int(v) for v in text.split(",") if v.strip()], dtype=torch.long)
    except ValueError:
        raise UsageError(f"--labels expects comma-separated integers, got {text!r}") from None


def _parse_prompts(args: argparse.Namespace) -> list[str] | None:
    """``--prompt`` (repeatable) then the lines of ``--prompts-file``; None when neither."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file {path}: no such file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file {path}: no prompts in it")
    return prompts or None


def _sample_config(spec: Any, args: argparse.Namespace) -> Any:
    """The checkpoint's sampling config with the command line's choices on top."""
    updates = {
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "eta": args.eta,
    }
    merged = spec.config.sample.model_dump() | {k: v for k, v in updates.items() if v is not None}
    from diffusion_core.config import SampleConfig, parse_config

    parse_config({"sample": merged}, source="command line")  # names a bad value clearly
    return SampleConfig.model_validate(merged)


# ----------------------------------------------------------------------------------------------
# Commands.


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from diffusion_core.data import load_dataset, split_dataset
    from diffusion_core.storage import diffpipe_home
    from diffusion_core.training import train

    out = Path(args.out) if args.out else diffpipe_home() / "runs" / cfg.name
    dataset = load_dataset(cfg.data)
    train_set, _ = split_dataset(
        dataset, holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    log.info(
        "training on %d images from %s (%d skipped)",
        len(train_set),
        dataset.source,
        dataset.skipped,
    )
    result = train(cfg, train_set, out, max_steps=args.max_steps, progress=not args.quiet)
    print(f"checkpoint: {result.checkpoint}")
    if result.history:
        last = result.history[-1]
        print(
            f"steps run: {result.steps}, last loss {last['loss']:.4f}, "
            f"{result.images_per_second:.1f} img/s"
        )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from diffusion_core.images import save_grid, to_pil
    from diffusion_core.sampling import generate
    from diffusion_core.training import load_model

    net, spec = load_model(args.checkpoint)
    sc = _sample_config(spec, args)
    labels = _parse_labels(args.labels)
    prompts = _parse_prompts(args)
    samples = generate(
        net,
        spec,
        sc,
        num_samples=args.num if labels is None else None,
        labels=labels,
        prompts=prompts,
    )
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        nrow = spec.num_classes if spec.num_classes and labels is None else None
        if prompts is not None:  # one column per prompt
            nrow = min(len(prompts), len(samples.images))
        save_grid(samples.images, out, nrow=nrow, scale=args.scale)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(samples.images):
            to_pil(img).save(out / f"{i:05d}.png")
    if samples.prompts is not None:  # sample i's prompt on line i
        listing = out / "prompts.txt" if out.suffix.lower() != ".png" else out.with_suffix(".txt")
        listing.write_text("".join(f"{p}\n" for p in samples.prompts))
    print(
        f"{len(samples.images)} samples ({sc.sampler}, {sc.steps} steps, "
        f"guidance {sc.guidance_scale}) -> {out}"
    )
    return 0


def _inpaint_model(args: argparse.Namespace) -> Any:
    """The network and spec behind ``--model`` (a models:/ URI or a checkpoint directory) or
    ``--checkpoint``."""
    import tempfile

    from diffusion_core.training import load_model, load_model_files

    source = args.model or args.checkpoint
    if not source.startswith("models:/"):
        return load_model(source)
    from tasks import tracking

    with tempfile.TemporaryDirectory(prefix="diffpipe-model-") as tmp:
        config, weights = tracking.download_model_files(tracking.tracking_uri(), source, tmp)
        return load_model_files(config, weights)


def cmd_inpaint(args: argparse.Namespace) -> int:
    """One image to a .png grid of ``--num`` completions, or a folder of images to a folder of
    completions (one each unless ``--num``); every input is read and checked before any work."""
    import torch

    from diffusion_core.images import atomic_path, save_grid
    from diffusion_core.inpainting import (
        Job,
        batch_jobs,
        read_image_exact,
        read_mask_exact,
        write_pngs,
    )
    from diffusion_core.sampling import inpaint_images

    image, out = Path(args.image), Path(args.out)
    batch = image.is_dir()
    if batch and out.suffix.lower() == ".png":
        raise UsageError(f"--image {image} is a folder, so --out must be a folder, got {out}")
    if not batch and out.suffix.lower() != ".png":
        raise UsageError(
            f"--out must be a .png file for one image (a folder for --image DIR): {out}"
        )
    if args.num is not None and args.num < 1:
        raise UsageError(f"--num must be at least 1, got {args.num}")
    jobs = batch_jobs(image, args.mask) if batch else [Job(image, Path(args.mask), out.name)]
    net, spec = _inpaint_model(args)
    sc = _sample_config(spec, args)
    size, channels = spec.image_size, spec.in_channels
    known = torch.stack([read_image_exact(j.image, size=size, channels=channels) for j in jobs])
    masks = torch.cat([read_mask_exact(j.mask, size=size) for j in jobs])  # (N, 1, H, W)
    n = args.num or (1 if batch else 8)
    known, masks = known.repeat_interleave(n, 0), masks.repeat_interleave(n, 0)
    labels = _parse_labels(args.labels)
    if labels is not None and len(labels) == 1:
        labels = labels.repeat(len(known))
    if labels is not None and len(labels) != len(known):
        raise UsageError(f"--labels gives {len(labels)} labels for {len(known)} completions")
    filled = torch.cat(
        [
            inpaint_images(
                net, spec, sc, known[sl], masks[sl],
                labels=None if labels is None else labels[sl],
                jump_length=args.jump_length, resample=args.resample,
            )
            for sl in (slice(i, i + sc.batch_size) for i in range(0, len(known), sc.batch_size))
        ]
    )  # fmt: skip
    if batch:
        names = [
            j.name if n == 1 else f"{Path(j.name).stem}-{k}.png" for j in jobs for k in range(n)
        ]
        write_pngs(list(filled), names, out)
    else:
        with atomic_path(out) as tmp:
            save_grid(filled, tmp, scale=args.scale)
    print(f"{len(filled)} inpainted images -> {out}")
    return 0


def _parse_steps(text: str | None, num_steps: int) -> list[int]:
    """``0,50,100`` to timesteps in [0, num_steps); by default the report's fractions of T."""
    from diffusion_core.report import PROGRESSION_FRACTIONS

    if text is None:
        return sorted({min(num_steps - 1, round(f * num_steps)) for f in PROGRESSION_FRACTIONS})
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--steps expects comma-separated integers, got {text!r}") from None
    bad = [t for t in steps if not 0 <= t < num_steps]
    if not steps or bad:
        raise UsageError(f"--steps must be timesteps in [0, {num_steps - 1}], got {text!r}")
    return steps


def _read_plot_images(paths: Sequence[str]) -> Any:
    """Image files of one size as uint8 (N, C, H, W), at their own size and colour."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
                arr = np.asarray(img.convert("L" if gray else "RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"{path}: cannot read image ({exc})") from None
        arr = arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)
        if arrays and arr.shape != arrays[0].shape:
            raise UsageError(f"{path}: image is {arr.shape}, the first is {arrays[0].shape}")
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, C, H, W)


def cmd_plot(args: argparse.Namespace) -> int:
    """The report's schedule and forward-process figures for any image or schedule."""
    from diffusion_core import plots
    from diffusion_core.images import atomic_path
    from diffusion_core.schedules import BETA_SCHEDULES, NoiseSchedule

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got {out}")
    if args.figure == "schedules":
        names = [v.strip() for v in args.schedules.split(",") if v.strip()]
        unknown = [v for v in names if v not in BETA_SCHEDULES]
        if not names or unknown:
            raise UsageError(
                f"--schedules takes names from {sorted(BETA_SCHEDULES)}, got {args.schedules!r}"
            )
        with atomic_path(out) as tmp:
            plots.plot_schedules(tmp, num_steps=args.num_steps or 1000, names=names)
        print(f"schedules {', '.join(names)} -> {out}")
        return 0
    diffusion = _load(args).diffusion if args.config else None
    name = args.schedule or (diffusion.schedule if diffusion else "linear")
    num_steps = args.num_steps or (diffusion.num_steps if diffusion else 1000)
    if num_steps < 2:
        raise UsageError(f"--num-steps must be at least 2, got {num_steps}")
    steps = _parse_steps(args.steps, num_steps)
    images = _read_plot_images(args.image)
    with atomic_path(out) as tmp:
        plots.plot_noise_progression(
            tmp,
            images,
            NoiseSchedule.from_name(name, num_steps),
            steps=steps,
            seed=args.seed,
            title=f"Forward process q(x_t | x_0), {name} schedule, {num_steps} steps",
        )
    print(f"{len(images)} image(s) at t = {', '.join(map(str, steps))} ({name}) -> {out}")
    return 0


def _prefect_env() -> None:
    """Embedded defaults: Prefect's local API on SQLite under DIFFPIPE_HOME (unless the user
    points PREFECT_API_URL at a server)."""
    from diffusion_core.storage import diffpipe_home

    home = diffpipe_home()
    os.environ.setdefault("DIFFPIPE_HOME", str(home))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes no parents
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _finish(summary: dict[str, Any], args: argparse.Namespace) -> None:
    from flows.pipeline import write_summary

    if args.summary_out:
        write_summary(summary, args.summary_out)
    metrics = summary.get("metrics", {})
    model = summary["model"]
    print(
        f"model: {model['name']} v{model['version']} ({', '.join(model['aliases']) or 'no alias'})"
    )
    for key in ("fid", "fid_half_over_floor", "kid", "conditional_accuracy"):
        if key in metrics:
            print(f"{key}: {metrics[key]:.4f}")
    if "samples" in summary:
        s = summary["samples"]
        print(f"samples: {s['published']} published, {s['quarantined']} quarantined")
    for row in summary.get("inpainting", []):
        print(
            f"inpainting {row['mask']}/{row['method']}: PSNR {row['psnr']:.2f} dB, "
            f"seam/real {row['seam_ratio']:.3f}"
        )
    print(f"report: {summary.get('report_uri', '(not evaluated)')}")


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set or [])
    from diffusion_core.config import load_config

    load_config(args.config, overrides)  # validate before anything starts
    _prefect_env()
    from flows.pipeline import nightly

    _finish(nightly(config_path=str(args.config), overrides=overrides or None), args)
    return 0


def _evaluation_section(path: str | None) -> dict[str, Any] | None:
    """The validated ``evaluation:`` section of a YAML file (None without a file)."""
    if path is None:
        return None
    from diffusion_core.config import ConfigError, parse_config

    if not Path(path).is_file():
        raise ConfigError(f"{path}: file not found")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or "evaluation" not in data:
        raise ConfigError(f"{path}: needs an 'evaluation:' section")
    parse_config({"evaluation": data["evaluation"]}, source=path)
    section: dict[str, Any] = data["evaluation"]
    return section


def cmd_evaluate(args: argparse.Namespace) -> int:
    evaluation = _evaluation_section(args.evaluation)  # validate before anything starts
    _prefect_env()
    from flows.pipeline import evaluate_model

    _finish(evaluate_model(model_uri=args.model, evaluation=evaluation), args)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Print every registered version of ``--model`` with its metrics, record, aliases and the
    decision the promotion rule gives it against the current champion."""
    import shutil

    from tasks import tracking

    table = tracking.comparison_table(tracking.tracking_uri(), args.model)
    if args.columns:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in table.columns]
        if unknown:
            raise UsageError(
                f"--columns: no column {', '.join(map(repr, unknown))} "
                f"(columns: {', '.join(table.columns)})"
            )
        table = table[wanted]
    if args.format == "csv":
        print(table.to_csv(index=False), end="")
    elif args.format == "json":
        print(table.to_json(orient="records", date_format="iso", indent=2))
    elif table.empty:
        print(f"{args.model}: no registered versions")
    else:
        width = shutil.get_terminal_size((200, 40)).columns
        for column in [c for c in table.columns if c.endswith("sha256")]:  # 12 hex digits
            table[column] = [v[:12] if isinstance(v, str) else v for v in table[column]]
        print(table.to_string(index=False, line_width=width, max_colwidth=80))
    return 0


def cmd_calibrate_safety(args: argparse.Namespace) -> int:
    """Pick per-concept thresholds on a labelled folder and write them into a config."""
    from diffusion_core.concepts import calibrate_config

    results = calibrate_config(
        args.config, args.data, args.out, target_fnr=args.target_fnr, detector=args.detector
    )
    for r in results.values():
        print(
            f"{r.concept}: threshold {r.threshold:.4f}, FNR {r.fnr:.3f} of {r.num_unsafe} "
            f"unsafe, FPR {r.fpr:.3f} of {r.num_safe} safe"
        )
    print(f"config -> {args.out}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Register deployments/prefect.yaml with the Prefect server at PREFECT_API_URL."""
    import subprocess

    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError(
            "PREFECT_API_URL is not set: start a server (prefect server start) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prefect = [sys.executable, "-m", "prefect"]
    pools = subprocess.run([*prefect, "work-pool", "ls"], capture_output=True, text=True)
    if args.pool not in pools.stdout:
        subprocess.run(
            [*prefect, "work-pool", "create", args.pool, "--type", "process"], check=True
        )
    deploy = [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", args.prefect_file]
    result = subprocess.run(deploy, cwd=Path(args.prefect_file).resolve().parents[1])
    if result.returncode != 0:
        print("diffpipe: prefect deploy failed", file=sys.stderr)
        return EXIT_FAILED
    print(f"deployments registered; start a worker: prefect worker start --pool {args.pool}")
    return 0


def _describe_mark(path: str, key: Any, strength: float) -> bool:
    """Print what ``path`` carries; True when it holds a valid mark under ``key``."""
    from diffusion_core import watermark as wm

    reading = wm.decode(wm.load_image(path), key, strength=strength)[0]
    meta = wm.read_png_provenance(path)
    said = ""
    if meta:
        said = f"; PNG metadata: model {meta.model} v{meta.version}, run {meta.run_id}, key id "
        said += meta.key_id
    if reading.payload is None:
        hint = ""
        if meta and meta.key_id != key.key_id:
            hint = f" (the metadata names key id {meta.key_id}, this key is {key.key_id})"
        print(f"{path}: not marked under key id {key.key_id}{hint}{said}")
        return False
    p = reading.payload
    mark = f"model tag {p.model_tag:04x}, version {p.version}"
    print(f"{path}: marked: {mark} (margin {reading.margin:.1f}){said}")
    if meta and (not p.matches_model(meta.model) or str(p.version) != meta.version):
        print(f"{path}: warning: the PNG metadata does not match the mark ({mark})")
    return True


def cmd_verify_watermark(args: argparse.Namespace) -> int:
    """Exit 0 when every image holds a valid mark, 1 when one does not, 2 when one is
    unreadable (each image is reported either way)."""
    from diffusion_core import watermark as wm

    key = wm.load_key(key_file=args.key_file, key_env=args.key_env or wm.KEY_ENV)
    strength = wm.DEFAULT_STRENGTH if args.strength is None else args.strength
    unmarked = unreadable = 0
    for path in args.images:
        try:
            unmarked += not _describe_mark(path, key, strength)
        except wm.WatermarkError as exc:
            print(f"diffpipe: error: {exc}", file=sys.stderr)
            unreadable += 1
    return EXIT_BAD_INPUT if unreadable else EXIT_FAILED if unmarked else 0


# ----------------------------------------------------------------------------------------------
# Argument parsing.


def _add_sampling_args(p: argparse.ArgumentParser, *, registered: bool = False) -> None:
    """The sampling knobs; with ``registered``, ``--model`` (a registry URI) may replace
    ``--checkpoint``."""
    where = p.add_mutually_exclusive_group(required=True) if registered else p
    where.add_argument(
        "--checkpoint", required=not registered,
        help="checkpoint directory (or a run's checkpoints/ folder)",
    )  # fmt: skip
    if registered:
        where.add_argument(
            "--model", help="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint dir"
        )
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"], help="default: the config's")
    p.add_argument("--steps", type=int, help="sampling steps (network evaluations)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=float, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    p.add_argument("--seed", type=int, help="seed for the initial noise")
    p.add_argument("--labels", help="comma-separated class labels, one per sample")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the saved grid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpipe",
        description="Train, sample, inpaint, safety-filter and evaluate diffusion models.",
        epilog="Exit codes: 0 success, 1 failed run, 2 bad input. "
        "Outputs go under $DIFFPIPE_HOME (default ./.diffpipe).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/quickstart.yaml")
    p.add_argument("--out", help="output directory (default: $DIFFPIPE_HOME/runs/<name>)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.steps=100",
    )
    p.add_argument("--max-steps", type=int, help="stop at this step; a later run resumes")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a checkpoint")
    _add_sampling_args(p)
    p.add_argument("--num", type=int, default=64, help="number of samples (class-balanced)")
    p.add_argument(
        "--prompt",
        action="append",
        help="text-conditioned models: a prompt (repeatable; samples cycle through them)",
    )
    p.add_argument("--prompts-file", help="text-conditioned models: one prompt a line")
    p.add_argument("--out", required=True, help="a .png grid, or a directory of PNG files")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("inpaint", help="fill the masked region of an image or a folder (RePaint)")
    _add_sampling_args(p, registered=True)
    p.add_argument("--image", required=True, help="the image to complete, or a folder of images")
    p.add_argument(
        "--mask", required=True,
        help="mask image (white = keep, black = fill), or a folder of masks named as the images",
    )  # fmt: skip
    p.add_argument("--num", type=int, help="completions per image (default: 8, 1 for a folder)")
    p.add_argument("--jump-length", type=int, default=10)
    p.add_argument("--resample", type=int, default=10, help="RePaint resampling count (1 = none)")
    p.add_argument("--out", required=True, help="output .png grid, or a folder for --image DIR")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("plot", help="figures: the forward noise process, the noise schedules")
    figures = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    q = figures.add_parser("noise", help="images noised to increasing timesteps, q(x_t | x_0)")
    q.add_argument(
        "--image", required=True, nargs="+", help="image file(s) of one size, a row each"
    )
    q.add_argument("--steps", help="comma-separated timesteps (default: 0, 5%%, ..., 100%% of T)")
    q.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"], help="default: config's")
    q.add_argument("--num-steps", type=int, help="training steps T (default: config's or 1000)")
    q.add_argument("--config", help="take the schedule and T from this run config")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    q.add_argument("--seed", type=int, default=0, help="seed of the noise draw")
    q.add_argument("--out", required=True, help="output .png")
    q.set_defaults(func=cmd_plot)
    q = figures.add_parser("schedules", help="beta_t, alpha_bar_t and log-SNR of the schedules")
    q.add_argument("--schedules", default="linear,cosine", help="comma-separated schedule names")
    q.add_argument("--num-steps", type=int, help="training steps T (default 1000)")
    q.add_argument("--out", required=True, help="output .png")
    q.set_defaults(func=cmd_plot)
    p = sub.add_parser("run", help="run the whole nightly pipeline (Prefect flow) on a config")
    p.add_argument("--config", default="configs/quickstart.yaml", help="YAML run config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--summary-out", help="write the run's summary JSON here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="sample, filter, evaluate and report a registered model")
    p.add_argument(
        "--model", required=True, help="models:/<name>/<version> or models:/<name>@<alias>"
    )
    p.add_argument("--summary-out", help="write the evaluation's summary JSON here")
    p.add_argument(
        "--evaluation", metavar="YAML", help="use this file's evaluation: section (e.g. a sweep)"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("deploy", help="register the Prefect deployments (needs PREFECT_API_URL)")
    p.add_argument("--prefect-file", default="deployments/prefect.yaml")
    p.add_argument("--pool", default="diffpipe", help="process work pool (created when missing)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "calibrate-safety", help="calibrate concept thresholds on safe/ and unsafe/<concept>/"
    )
    p.add_argument("--data", required=True, help="folder with safe/ and unsafe/<concept>/ images")
    p.add_argument("--config", required=True, help="run config whose safety section to calibrate")
    p.add_argument("--target-fnr", type=float, default=0.05, help="false-negative rate to allow")
    p.add_argument("--detector", default="concept", help="name of the concept detector entry")
    p.add_argument("--out", required=True, help="where to write the calibrated config YAML")
    p.set_defaults(func=cmd_calibrate_safety)

    p = sub.add_parser("compare", help="table of a registered model's versions and their metrics")
    p.add_argument("--model", default="quickstart", help="registered model name")
    p.add_argument("--columns", help="comma-separated columns to show")
    p.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="output format"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "verify-watermark",
        help="read the invisible watermark (and PNG provenance) of published images",
        epilog="Exit codes: 0 every image is marked, 1 one is not, 2 one cannot be read.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--key-file", help="the watermark key file (default: $DIFFPIPE_WATERMARK_KEY, "
                   "else $DIFFPIPE_HOME/watermark.key)")  # fmt: skip
    p.add_argument("--key-env", help="environment variable holding the key "
                   "(default DIFFPIPE_WATERMARK_KEY)")  # fmt: skip
    p.add_argument("--strength", type=float, help="the pipeline.watermark.strength the images "
                   "were marked with (default 18)")  # fmt: skip
    p.set_defaults(func=cmd_verify_watermark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if args.func in (cmd_run, cmd_evaluate):  # Prefect's handlers print the library's records
        logging.getLogger("diffusion_core").setLevel(level)
    else:
        logging.basicConfig(level=level, format=fmt)
    from diffusion_core.config import ConfigError
    from diffusion_core.data import DatasetError
    from diffusion_core.storage import StorageError
    from diffusion_core.training import TrainingError

    try:
        return int(args.func(args))
    except (ConfigError, DatasetError, UsageError, FileNotFoundError) as exc:
        print(f"diffpipe: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as exc:
        print(f"diffpipe: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as exc:
        print(f"diffpipe: training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StorageError as exc:
        print(f"diffpipe: storage failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
