"""The ``diffpipe`` command: arguments in, exit codes out. The commands themselves are in
``diffpipe.flows.commands``; this module parses arguments and is the one place where errors become
messages.

Exit codes: 0 success, 1 a run that failed (naming the step), 2 bad input (naming the file, key or
value).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any, get_args

from diffpipe.flows import commands, runs
from diffpipe.flows.commands import EXIT_BAD_INPUT, EXIT_FAILED, UsageError

from diffusion_core.config import ConfigError, SamplerName

log = logging.getLogger("diffpipe")


def _add_sampling_args(p: argparse.ArgumentParser, *, registered: bool = False) -> None:
    """The sampling knobs; with ``registered``, ``--model`` (a registry URI) may replace
    ``--checkpoint``."""
    where = p.add_mutually_exclusive_group(required=True) if registered else p
    where.add_argument(
        "--checkpoint",
        required=not registered,
        help="checkpoint directory (or a run's checkpoints/ folder)",
    )
    if registered:
        where.add_argument(
            "--model", help="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint dir"
        )
    p.add_argument("--sampler", choices=get_args(SamplerName), help="default: the model's")
    p.add_argument("--steps", type=int, help="sampling steps (network evaluations)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=float, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    p.add_argument("--seed", type=int, help="seed for the initial noise")
    p.add_argument("--labels", help="comma-separated class labels, one per sample")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the saved grid")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpipe",
        description="Train, sample, inpaint, safety-filter and evaluate diffusion models.",
        epilog="Exit codes: 0 success, 1 failed run, 2 bad input. "
        "Outputs go under $DIFFPIPE_HOME (default ./.diffpipe).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_library_commands(sub)
    _add_pipeline_commands(sub)
    _add_safety_commands(sub)
    return parser


def _add_library_commands(sub: Any) -> None:
    """train, sample, inpaint, plot: the library on local files."""
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
    p.set_defaults(func=commands.train)

    p = sub.add_parser("sample", help="draw samples from a checkpoint or a registered version")
    _add_sampling_args(p, registered=True)
    p.add_argument(
        "--num", type=int, help="number of samples (class-balanced; default: one per label, or 64)"
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="text-conditioned models: a prompt (repeatable; samples cycle through them)",
    )
    p.add_argument("--prompts-file", help="text-conditioned models: one prompt a line")
    p.add_argument("--out", required=True, help="a .png grid, or a directory of PNG files")
    p.set_defaults(func=commands.sample)

    p = sub.add_parser("inpaint", help="fill the masked region of an image or a folder (RePaint)")
    _add_sampling_args(p, registered=True)
    p.add_argument("--image", required=True, help="the image to complete, or a folder of images")
    p.add_argument(
        "--mask",
        required=True,
        help="mask image (white = keep, black = fill), or a folder of masks named as the images",
    )
    p.add_argument("--num", type=int, help="completions per image (default: 8, 1 for a folder)")
    p.add_argument("--jump-length", type=int, default=10)
    p.add_argument("--resample", type=int, default=10, help="RePaint resampling count (1 = none)")
    p.add_argument("--out", required=True, help="output .png grid, or a folder for --image DIR")
    p.set_defaults(func=commands.inpaint)

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
    q.set_defaults(func=commands.plot)
    q = figures.add_parser("schedules", help="beta_t, alpha_bar_t and log-SNR of the schedules")
    q.add_argument("--schedules", default="linear,cosine", help="comma-separated schedule names")
    q.add_argument("--num-steps", type=int, help="training steps T (default 1000)")
    q.add_argument("--out", required=True, help="output .png")
    q.set_defaults(func=commands.plot)


def _add_pipeline_commands(sub: Any) -> None:
    """run, evaluate, compare, deploy: the pipeline, MLflow and Prefect."""
    p = sub.add_parser("run", help="run the whole nightly pipeline (Prefect flow) on a config")
    p.add_argument(
        "--config", default="quickstart", help="YAML run config, or a packaged config's name"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--summary-out", help="write the run's summary JSON here")
    p.set_defaults(func=runs.run)

    p = sub.add_parser("evaluate", help="sample, filter, evaluate and report a registered model")
    p.add_argument(
        "--model", required=True, help="models:/<name>/<version> or models:/<name>@<alias>"
    )
    p.add_argument("--summary-out", help="write the evaluation's summary JSON here")
    p.add_argument(
        "--config",
        help="take the sample, safety, evaluation and pipeline sections from this run config "
        "(default: the defaults, with the model's own sampling)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument(
        "--evaluation", metavar="YAML", help="use this file's evaluation: section (e.g. a sweep)"
    )
    p.set_defaults(func=runs.evaluate)

    p = sub.add_parser("compare", help="table of a registered model's versions and their metrics")
    p.add_argument("--model", default="quickstart", help="registered model name")
    p.add_argument("--columns", help="comma-separated columns to show")
    p.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="output format"
    )
    p.set_defaults(func=runs.compare)

    p = sub.add_parser("deploy", help="register the Prefect deployments (needs PREFECT_API_URL)")
    p.add_argument(
        "--prefect-file", help="deployment file (default: the packaged deployments/prefect.yaml)"
    )
    p.add_argument(
        "--pool",
        default="diffpipe",
        help="the work pool every deployment uses (created if missing)",
    )
    p.add_argument(
        "--pool-type", default="process", help="type of a pool to create: process, docker, ..."
    )
    p.add_argument("--job-template", help="base job template (JSON) of a pool to create")
    p.add_argument(
        "--automations",
        help="automations to register (default: the packaged deployments/automations.yaml; "
        "none: no automations)",
    )
    p.set_defaults(func=runs.deploy)

    p = sub.add_parser(
        "train-node", help="join a multi-node training as node DIFFPIPE_NODE_RANK (> 0)"
    )
    p.add_argument("--artefact-root", required=True, help="the store node 0 trains from")
    p.add_argument("--work-dir", help="local training directory (default: $DIFFPIPE_HOME/work)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for node 0")
    p.set_defaults(func=runs.train_node)


def _add_safety_commands(sub: Any) -> None:
    """calibrate-safety, verify-watermark."""
    p = sub.add_parser(
        "calibrate-safety", help="calibrate concept thresholds on safe/ and unsafe/<concept>/"
    )
    p.add_argument("--data", required=True, help="folder with safe/ and unsafe/<concept>/ images")
    p.add_argument("--config", required=True, help="run config whose safety section to calibrate")
    p.add_argument("--target-fnr", type=float, default=0.05, help="false-negative rate to allow")
    p.add_argument("--detector", default="concept", help="name of the concept detector entry")
    p.add_argument("--out", required=True, help="where to write the calibrated config YAML")
    p.set_defaults(func=commands.calibrate_safety)

    p = sub.add_parser(
        "verify-watermark",
        help="read the invisible watermark (and PNG provenance) of published images",
        epilog="Exit codes: 0 every image is marked, 1 one is not, 2 one cannot be read.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument(
        "--key-file",
        help="the watermark key file (default: $DIFFPIPE_WATERMARK_KEY, "
        "else $DIFFPIPE_HOME/watermark.key)",
    )
    p.add_argument(
        "--key-env", help="environment variable holding the key (default DIFFPIPE_WATERMARK_KEY)"
    )
    p.add_argument(
        "--strength",
        type=float,
        help="the pipeline.watermark.strength the images were marked with (default 18)",
    )
    p.set_defaults(func=commands.verify_watermark)


def _bad_input() -> tuple[type[BaseException], ...]:
    """Errors that mean the input (config, files, arguments) is wrong."""
    from pydantic import ValidationError

    from diffusion_core.data import DatasetError
    from diffusion_core.distributed import DeviceError
    from diffusion_core.io import ImageReadError, WeightsError
    from diffusion_core.model import CheckpointError
    from diffusion_core.text import ClipError

    return (
        ConfigError,
        UsageError,
        DatasetError,
        DeviceError,
        CheckpointError,
        ImageReadError,
        WeightsError,
        ClipError,
        ValidationError,
        FileNotFoundError,
    )


def _message(exc: BaseException) -> str:
    """The error as one line; a pydantic ValidationError as ``what: key: rule (got value)``."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = [
        f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} (got {e.get('input')!r})"
        for e in exc.errors()
    ]
    return f"{exc.title}: " + "; ".join(problems)


def _report(exc: BaseException) -> int:
    """Print what went wrong and return the exit code that says what kind of failure it was
    (with the path of the log file that holds the traceback, when the command keeps one)."""
    code = _describe(exc)
    log_file = runs.LOG_FILE
    if code is None:  # not a failure we know: the traceback goes to a file, never the console
        log_file = log_file or runs.crash_log()
        with open(log_file, "a") as f:
            f.write("".join(traceback.format_exception(exc)))
        print(f"diffpipe: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    if log_file is not None:
        print(f"diffpipe: the full log, with the traceback: {log_file}", file=sys.stderr)
    return code


def _describe(exc: BaseException) -> int | None:
    from diffusion_core.pipeline.errors import RunFailed, StorageError
    from diffusion_core.pipeline.lock import LockHeld
    from diffusion_core.training import TrainingError

    if isinstance(exc, RunFailed):
        cause = exc.cause
        if isinstance(cause, _bad_input()):
            print(f"diffpipe: error in step {exc.step}: {_message(cause)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        kind = "storage failed" if isinstance(cause, StorageError) else "run failed"
        print(f"diffpipe: {kind} in step {exc.step}: {cause}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(exc, LockHeld):
        print(f"diffpipe: not started: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(exc, TrainingError):
        print(f"diffpipe: training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(exc, StorageError):
        print(f"diffpipe: storage failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(exc, (*_bad_input(), ValueError)):
        print(f"diffpipe: error: {_message(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if args.func in (runs.run, runs.evaluate):  # Prefect's handlers print these
        logging.getLogger("diffusion_core").setLevel(level)
    else:
        logging.basicConfig(level=level, format=fmt)
    runs.LOG_FILE = None  # this command's own log file, once it keeps one
    try:
        return int(args.func(args))
    except Exception as exc:
        return _report(exc)


if __name__ == "__main__":
    sys.exit(main())
