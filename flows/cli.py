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


def cmd_inpaint(args: argparse.Namespace) -> int:
    from diffusion_core.guidance import load_mask
    from diffusion_core.images import read_image, save_grid
    from diffusion_core.sampling import inpaint_images
    from diffusion_core.training import load_model

    net, spec = load_model(args.checkpoint)
    sc = _sample_config(spec, args)
    image = read_image(args.image, size=spec.image_size, channels=spec.in_channels)
    mask = load_mask(args.mask, spec.image_size)
    n = args.num
    labels = _parse_labels(args.labels)
    if labels is not None and len(labels) == 1:
        labels = labels.repeat(n)
    known = image.unsqueeze(0).repeat(n, 1, 1, 1)  # (N, C, H, W)
    filled = inpaint_images(
        net,
        spec,
        sc,
        known,
        mask,
        labels=labels,
        jump_length=args.jump_length,
        resample=args.resample,
    )
    save_grid(filled, args.out, scale=args.scale)
    print(f"{n} inpainted images -> {args.out}")
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
    print(f"report: {summary.get('report_uri', '(not evaluated)')}")


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set or [])
    from diffusion_core.config import load_config

    load_config(args.config, overrides)  # validate before anything starts
    _prefect_env()
    from flows.pipeline import nightly

    _finish(nightly(config_path=str(args.config), overrides=overrides or None), args)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.pipeline import evaluate_model

    _finish(evaluate_model(model_uri=args.model), args)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from tasks import tracking

    table = tracking.comparison_table(tracking.tracking_uri(), args.model)
    columns = [c for c in table.columns if c in args.columns.split(",")] if args.columns else None
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[columns] if columns else table)
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


# ----------------------------------------------------------------------------------------------
# Argument parsing.


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (or a run's checkpoints/ folder)"
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
        description="Train, sample and inpaint image diffusion models.",
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

    p = sub.add_parser("inpaint", help="fill the masked region of an image (RePaint)")
    _add_sampling_args(p)
    p.add_argument("--image", required=True, help="the image to complete")
    p.add_argument("--mask", required=True, help="mask image: white = keep, black = fill")
    p.add_argument("--num", type=int, default=8, help="number of completions")
    p.add_argument("--jump-length", type=int, default=10)
    p.add_argument("--resample", type=int, default=10, help="RePaint resampling count (1 = none)")
    p.add_argument("--out", required=True, help="output .png grid")
    p.set_defaults(func=cmd_inpaint)
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
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("deploy", help="register the Prefect deployments (needs PREFECT_API_URL)")
    p.add_argument("--prefect-file", default="deployments/prefect.yaml")
    p.add_argument("--pool", default="diffpipe", help="process work pool (created when missing)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("compare", help="table of a registered model's versions and their metrics")
    p.add_argument("--model", default="quickstart", help="registered model name")
    p.add_argument("--columns", help="comma-separated columns to show")
    p.set_defaults(func=cmd_compare)
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
