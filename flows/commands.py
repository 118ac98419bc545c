"""What the library commands of ``diffpipe`` do (train, sample, inpaint, plot, calibrate-safety,
verify-watermark), over parsed arguments; the pipeline's commands are in ``diffpipe.flows.runs``.
Errors are raised, never printed: ``diffpipe.flows.cli`` turns them into messages and exit codes."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffusion_core.config import RunConfig, diffpipe_home

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
DEFAULT_NUM = 64  # diffpipe sample without --num or --labels


class UsageError(ValueError):
    """Bad command-line input."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``train.steps=100`` style overrides; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set expects KEY=VALUE with a dotted KEY, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UsageError(f"--set {key}: {value!r} is not a YAML value ({first})") from None
        except RecursionError:
            raise UsageError(f"--set {key}: the value is nested too deeply") from None
    return out


def load(args: argparse.Namespace) -> RunConfig:
    """The run config of ``--config`` (a file or a packaged name) with ``--set`` applied."""
    from diffpipe.flows.configs import config_path

    from diffusion_core.config import load_config

    return load_config(config_path(args.config), parse_overrides(args.set or []))


def _labels(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--labels expects comma-separated integers, got {text!r}") from None


def _prompts(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--prompt`` (repeatable) then the lines of ``--prompts-file``; None when neither."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file {path}: no such file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file {path}: no prompts in it")
    return tuple(prompts) or None


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling knobs given on the command line (the rest are the model card's)."""
    given = {
        "sampler": getattr(args, "sampler", None),
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "eta": getattr(args, "eta", None),
        "seed": args.seed,
        "labels": _labels(args.labels),
    }
    return {k: v for k, v in given.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# Training and sampling.


def train(args: argparse.Namespace) -> int:
    cfg = load(args)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from diffusion_core.data import load_dataset, split_dataset
    from diffusion_core.pipeline.stages.dataset import check_fits
    from diffusion_core.training import train

    out = Path(args.out) if args.out else diffpipe_home() / "runs" / cfg.name
    dataset = load_dataset(cfg.data)
    check_fits(cfg, dataset.class_names)
    train_set, _ = split_dataset(
        dataset, holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    print(f"training on {len(train_set)} images from {dataset.source} ({dataset.skipped} skipped)")
    result = train(cfg, train_set, out, max_steps=args.max_steps, progress=not args.quiet)
    print(f"checkpoint: {result.checkpoint}")
    if result.history:
        last = result.history[-1]
        print(
            f"steps run: {result.steps}, last loss {last['loss']:.4f}, "
            f"{result.images_per_second:.1f} img/s"
        )
    return 0


def sample(args: argparse.Namespace) -> int:
    from diffusion_core.distributed import inference_dtype, resolve_device
    from diffusion_core.io import save_grid, write_pngs
    from diffusion_core.sampling import SampleRequest, check_size, generate
    from diffusion_core.settings import settings

    out = Path(args.out)
    if out.exists() and not out.is_dir() and out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: a file that is not a .png; give a .png or a folder")
    if out.suffix.lower() not in ("", ".png"):
        raise UsageError(f"--out {out}: a grid is written as .png; give a .png or a folder name")
    if args.num is not None and args.num < 1:
        raise UsageError(f"--num must be at least 1, got {args.num}")
    prompts, knobs = _prompts(args), _sampling(args)
    num = args.num if args.num is not None else None if "labels" in knobs else DEFAULT_NUM
    request = SampleRequest(**knobs, prompts=prompts, num_samples=num)
    check_size(request, settings().max_samples)  # before the model is loaded
    net, card = _model(args)
    device = resolve_device(args.device)
    net = net.to(device)
    samples = generate(net, card, request, dtype=inference_dtype(device))
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        nrow = card.num_classes if card.num_classes and request.labels is None else None
        if prompts is not None:  # one column per prompt
            nrow = min(len(prompts), len(samples.images))
        save_grid(samples.images, out, nrow=nrow, scale=args.scale)
    else:
        names = [f"{i:05d}.png" for i in range(len(samples.images))]
        write_pngs(list(samples.images), names, out)
    if samples.prompts is not None:  # sample i's prompt on line i
        listing = out / "prompts.txt" if out.suffix.lower() != ".png" else out.with_suffix(".txt")
        listing.write_text("".join(f"{p}\n" for p in samples.prompts))
    k = samples.knobs
    print(
        f"{len(samples.images)} samples ({k.sampler}, {k.steps} steps, "
        f"guidance {k.guidance_scale}) -> {out}"
    )
    return 0


@dataclass(frozen=True)
class Job:
    """One image to complete, its mask and its output file name."""

    image: Path
    mask: Path
    name: str


def batch_jobs(image_dir: str | Path, mask: str | Path) -> list[Job]:
    """Pair every image in ``image_dir`` with ``mask`` (one file for all) or with the file of the
    same name in ``mask`` (a folder); outputs are named ``<stem>.png``."""
    from diffusion_core.io import IMAGE_SUFFIXES, list_images

    image_dir, mask = Path(image_dir), Path(mask)
    images = list_images(image_dir)
    if not images:
        raise UsageError(f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise UsageError(f"{p} and {stems[p.stem]} would both be written as {p.stem}.png")
        stems[p.stem] = p
    if not mask.is_dir():
        if not mask.is_file():
            raise UsageError(f"{mask}: no such mask file or folder")
        return [Job(p, mask, f"{p.stem}.png") for p in images]
    missing = [p for p in images if not (mask / p.name).is_file()]
    if missing:
        raise UsageError(
            f"{missing[0]}: no mask {mask / missing[0].name} "
            f"({len(missing)} of {len(images)} images have no mask of the same name)"
        )
    return [Job(p, mask / p.name, f"{p.stem}.png") for p in images]


def _model(args: argparse.Namespace) -> Any:
    """The network and card behind ``--model`` (a models:/ URI or a checkpoint directory) or
    ``--checkpoint``. A registered version's default sampling (``diffpipe.sampling``, set by a
    sampler sweep) replaces its card's."""
    from diffusion_core.config import SamplingDefaults
    from diffusion_core.model import ModelCard, load_model, load_network

    source = getattr(args, "model", None) or args.checkpoint
    if not source.startswith("models:/"):
        return load_model(source)
    from diffpipe.tasks import tracking

    uri = tracking.tracking_uri()
    with tempfile.TemporaryDirectory(prefix="diffpipe-model-") as tmp:
        card_file, weights = tracking.download_model_files(uri, source, tmp)
        card = ModelCard.read(card_file)
        net = load_network(card, weights)
    sampling = tracking.get_sampling(dict(tracking.resolve_version(uri, source).tags))
    if sampling:
        card = card.with_sampling(SamplingDefaults.model_validate(sampling))
    return net, card


def inpaint(args: argparse.Namespace) -> int:
    """One image to a .png grid of ``--num`` completions, or a folder of images to a folder of
    completions (one each unless ``--num``); every input is read and checked before any work."""
    import torch

    from diffusion_core.distributed import inference_dtype, resolve_device
    from diffusion_core.io import EXACT, read_image, read_mask, save_grid, write_pngs
    from diffusion_core.sampling import InpaintRequest, check_size, inpaint
    from diffusion_core.settings import settings

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
    total = len(jobs) * (args.num or (1 if batch else 8))
    check_size(InpaintRequest(num_samples=total), settings().max_samples)
    net, card = _model(args)
    device = resolve_device(args.device)
    net = net.to(device)
    request = InpaintRequest(
        **_sampling(args), jump_length=args.jump_length, resample=args.resample
    )
    policy = EXACT.sized(card.image_size, card.in_channels)
    known = torch.stack([read_image(j.image, policy) for j in jobs])
    masks = torch.cat([read_mask(j.mask, card.image_size) for j in jobs])  # (N, 1, H, W)
    n = args.num or (1 if batch else 8)
    known, masks = known.repeat_interleave(n, 0), masks.repeat_interleave(n, 0)
    filled = inpaint(net, card, request, known, masks, dtype=inference_dtype(device))
    if batch:
        names = [
            j.name if n == 1 else f"{Path(j.name).stem}-{k}.png" for j in jobs for k in range(n)
        ]
        write_pngs(list(filled), names, out)
    else:
        save_grid(filled, out, scale=args.scale)
    print(f"{len(filled)} inpainted images -> {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# Figures.


def _plot_steps(text: str | None, num_steps: int) -> list[int]:
    """``0,50,100`` to timesteps in [0, num_steps); by default the report's fractions of T."""
    from diffusion_core.report.html import PROGRESSION_FRACTIONS

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


def _plot_images(paths: Sequence[str]) -> Any:
    """Image files of one size as uint8 (N, C, H, W), at their own size and colour."""
    import torch

    from diffusion_core.io import read_image

    images = [read_image(path) for path in paths]
    for path, image in zip(paths, images, strict=True):
        if image.shape != images[0].shape:
            raise UsageError(
                f"{path}: image is {tuple(image.shape)}, the first is {tuple(images[0].shape)}"
            )
    return torch.stack(images)


def plot(args: argparse.Namespace) -> int:
    """The report's schedule and forward-process figures for any image or schedule."""
    from diffusion_core.io import atomic_path
    from diffusion_core.report import plots
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
    diffusion = load(args).diffusion if args.config else None
    name = args.schedule or (diffusion.schedule if diffusion else "linear")
    num_steps = args.num_steps or (diffusion.num_steps if diffusion else 1000)
    if num_steps < 2:
        raise UsageError(f"--num-steps must be at least 2, got {num_steps}")
    steps = _plot_steps(args.steps, num_steps)
    images = _plot_images(args.image)
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


def calibrate_safety(args: argparse.Namespace) -> int:
    """Pick per-concept thresholds on a labelled folder and write them into a config."""
    from diffusion_core.safety.calibrate import calibrate_config

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


def verify_watermark(args: argparse.Namespace) -> int:
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
            said = str(exc) if path in str(exc) else f"{path}: {exc}"
            print(f"diffpipe: error: {said}", file=sys.stderr)
            unreadable += 1
    return EXIT_BAD_INPUT if unreadable else EXIT_FAILED if unmarked else 0
