"""What the pipeline commands of ``diffpipe`` do (run, evaluate, compare, deploy), over parsed
arguments. Errors are raised, never printed: ``diffpipe.flows.cli`` turns them into messages and
exit codes."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from diffpipe.flows.commands import EXIT_FAILED, UsageError, load

from diffusion_core.config import ConfigError, EvaluationConfig, diffpipe_home
from diffusion_core.settings import settings


def prefect_env() -> None:
    """Embedded defaults: Prefect's local API on SQLite under DIFFPIPE_HOME (unless the user
    points PREFECT_API_URL at a server)."""
    home = diffpipe_home()
    os.environ.setdefault("DIFFPIPE_HOME", str(home))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    prefect_home = settings().prefect_home or home / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect makes no parents
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _finish(summary: dict[str, Any], args: argparse.Namespace) -> None:
    from diffpipe.flows.pipeline import write_summary

    if args.summary_out:
        write_summary(summary, args.summary_out)
    metrics = summary.get("metrics", {})
    model = summary["model"]
    print(
        f"model: {model['name']} v{model['version']} ({', '.join(model['aliases']) or 'no alias'})"
    )
    if "training" in summary:
        t = summary["training"]
        print(f"training: {t['steps_run']} steps run (checkpoint at step {t['steps']})")
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


def run(args: argparse.Namespace) -> int:
    cfg = load(args)  # parsed once, before anything starts
    prefect_env()
    from diffpipe.flows.pipeline import nightly

    _finish(nightly(config=cfg), args)
    return 0


def _evaluation_section(path: str | None) -> EvaluationConfig | None:
    """The ``evaluation:`` section of a YAML file (None without a file)."""
    if path is None:
        return None
    from diffusion_core.config import parse_config

    if not Path(path).is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "evaluation" not in data:
        raise ConfigError(f"{path}: needs an 'evaluation:' section")
    return parse_config({"evaluation": data["evaluation"]}, source=path).evaluation


def evaluate(args: argparse.Namespace) -> int:
    evaluation = _evaluation_section(args.evaluation)  # validated before anything starts
    cfg = load(args) if args.config else None
    prefect_env()
    from diffpipe.flows.pipeline import evaluate_model

    _finish(evaluate_model(model_uri=args.model, config=cfg, evaluation=evaluation), args)
    return 0


def compare(args: argparse.Namespace) -> int:
    """Print every registered version of ``--model`` with its metrics, record, aliases and the
    decision the promotion rule gives it against the current champion."""
    from diffpipe.tasks import tracking

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


def deploy(args: argparse.Namespace) -> int:
    """Register deployments/prefect.yaml with the Prefect server at PREFECT_API_URL."""
    if not settings().prefect_api_url:
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
