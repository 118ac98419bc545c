"""What the pipeline commands of ``diffpipe`` do (run, evaluate, compare, deploy), over parsed
arguments. Errors are raised, never printed: ``diffpipe.flows.cli`` turns them into messages and
exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
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


class _NoTraceback(logging.Formatter):
    """A console formatter that leaves tracebacks out (they go to the log file)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


LOG_FILE: Path | None = None  # this command's log file, once ``log_to_file`` ran


def log_to_file(command: str) -> Path:
    """Everything this command logs, tracebacks included, also goes to
    ``$DIFFPIPE_HOME/logs/<command>-<time>.log``; the console keeps one line a record. The CLI's
    error message gives the file's path."""
    global LOG_FILE
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's handlers exist from here on; adjusted below

    folder = diffpipe_home() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("prefect", "diffusion_core", "diffpipe"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
    names = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "diffusion_core", "diffpipe")
    for logger in (logging.getLogger(n) for n in names):
        for h in logger.handlers:
            if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler):
                h.setFormatter(_NoTraceback(h.formatter))
    LOG_FILE = path
    return path


def crash_log() -> Path:
    """A new log file for a command that kept none, for the traceback of an unexpected error."""
    folder = diffpipe_home() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


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
    from diffpipe.flows.server import temporary_server

    cfg = load(args)  # parsed once, before anything starts
    prefect_env()
    with temporary_server(diffpipe_home() / "logs"):
        log_to_file("run")
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
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply") from None
    if not isinstance(data, dict) or "evaluation" not in data:
        raise ConfigError(f"{path}: needs an 'evaluation:' section")
    return parse_config({"evaluation": data["evaluation"]}, source=path).evaluation


def evaluate(args: argparse.Namespace) -> int:
    from diffpipe.flows.server import temporary_server

    evaluation = _evaluation_section(args.evaluation)  # validated before anything starts
    cfg = load(args) if args.config else None
    prefect_env()
    with temporary_server(diffpipe_home() / "logs"):
        log_to_file("evaluate")
        from diffpipe.flows.pipeline import evaluate_model

        _finish(evaluate_model(model_uri=args.model, config=cfg, evaluation=evaluation), args)
    return 0


def compare(args: argparse.Namespace) -> int:
    """Print every registered version of ``--model`` with its metrics, record, aliases and the
    decision the promotion rule gives it against the current champion."""
    from diffpipe.tasks import comparison, tracking

    table = comparison.comparison_table(tracking.tracking_uri(), args.model)
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


def ensure_pool(name: str, *, kind: str, job_template: str | None) -> bool:
    """Create the work pool ``name`` (of ``kind``, with the base job template in the JSON file
    ``job_template``) unless the server has it; True when it was created. Asked through
    Prefect's client, by name."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    template: dict[str, Any] = {}
    if job_template:
        try:
            template = json.loads(Path(job_template).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--job-template {job_template}: not a JSON file ({exc})") from None
    api = settings().prefect_api_url
    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_work_pool(name)
                return False
            except ObjectNotFound:
                pool = WorkPoolCreate(name=name, type=kind, base_job_template=template)
                client.create_work_pool(work_pool=pool)
                return True
    except PrefectHTTPStatusError as exc:
        detail = exc.response.text[:300]
        raise UsageError(f"work pool {name!r} ({kind}): the server refused it: {detail}") from None
    except httpx.HTTPError as exc:
        raise UsageError(f"PREFECT_API_URL={api}: no Prefect server answers ({exc})") from None
    except ValueError as exc:  # the pool's name or template, as Prefect's model checks them
        raise UsageError(f"work pool {name!r}: {exc}") from None


def with_pool(prefect_file: Path, pool: str) -> dict[str, Any]:
    """The deployments of ``prefect_file``, every one on the work pool ``pool``."""
    from prefect.cli.deploy._models import PrefectYamlModel

    try:
        data = yaml.safe_load(prefect_file.read_text())
        PrefectYamlModel.model_validate(data)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise UsageError(f"{prefect_file}: not a Prefect deployment file ({exc})") from None
    for deployment in data.get("deployments") or []:
        deployment.setdefault("work_pool", {})["name"] = pool
    return data


def deploy(args: argparse.Namespace) -> int:
    """Register the deployments of ``--prefect-file`` on the work pool ``--pool`` (created when
    missing) with the Prefect server at PREFECT_API_URL."""
    if not settings().prefect_api_url:
        raise UsageError(
            "PREFECT_API_URL is not set: start a server (prefect server start) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prefect_file = Path(args.prefect_file or packaged_deployments() / "prefect.yaml")
    if not prefect_file.is_file():
        raise UsageError(f"--prefect-file {prefect_file}: no such file")
    if args.automations not in (None, "none") and not Path(args.automations).is_file():
        raise UsageError(f"--automations {args.automations}: no such file")
    data = with_pool(prefect_file, args.pool)
    if ensure_pool(args.pool, kind=args.pool_type, job_template=args.job_template):
        print(f"created work pool {args.pool!r} ({args.pool_type})")
    with tempfile.TemporaryDirectory(prefix="diffpipe-deploy-") as tmp:
        rendered = Path(tmp) / "prefect.yaml"
        rendered.write_text(yaml.safe_dump(data, sort_keys=False))
        command = [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(rendered),
        ]
        result = subprocess.run(command)  # module entrypoints: any working directory
    if result.returncode != 0:
        print("diffpipe: prefect deploy failed", file=sys.stderr)
        return EXIT_FAILED
    if args.automations != "none":
        automations = Path(args.automations or packaged_deployments() / "automations.yaml")
        for name in register_automations(automations):
            print(f"automation {name!r} registered")
    print(f"deployments registered; start a worker: prefect worker start --pool {args.pool}")
    return 0


PLACEHOLDER = re.compile(r"\{\{\s*(deployment|block):([^}\s]+)\s*\}\}")


def register_automations(path: Path) -> list[str]:
    """Create the automations of ``path`` (replacing those of the same name), with each
    ``{{ deployment:FLOW/NAME }}`` and ``{{ block:TYPE/NAME }}`` replaced by that object's id;
    their names. Each automation is checked with Prefect's model before anything is created."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:

        def resolve(match: re.Match[str]) -> str:
            kind, name = match.group(1), match.group(2)
            try:
                if kind == "deployment":
                    return str(client.read_deployment_by_name(name).id)
                block_type, _, block = name.partition("/")
                found = client.read_block_document_by_name(name=block, block_type_slug=block_type)
                return str(found.id)
            except ObjectNotFound:
                raise UsageError(f"{path}: no {kind} {name!r} on the Prefect server") from None

        def fill(value: Any) -> Any:
            if isinstance(value, str):
                return PLACEHOLDER.sub(resolve, value)
            if isinstance(value, list):
                return [fill(v) for v in value]
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            return value

        try:
            data = fill(yaml.safe_load(path.read_text()))
            automations = [AutomationCore.model_validate(a) for a in data["automations"]]
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"{path}: not a list of automations ({exc})") from None
        for automation in automations:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
    return [a.name for a in automations]


def packaged_deployments() -> Path:
    """The deployment files installed with diffpipe."""
    from importlib import resources

    return Path(str(resources.files("diffpipe.deployments")))


def train_node(args: argparse.Namespace) -> int:
    """Another machine of a multi-node training: joins node 0's torchrun rendezvous."""
    from diffusion_core.pipeline.stages.train import train_node as run_node
    from diffusion_core.pipeline.store import ArtefactStore

    work_dir = Path(args.work_dir) if args.work_dir else diffpipe_home() / "work"
    run_node(ArtefactStore(args.artefact_root), work_dir=work_dir, timeout=args.timeout)
    return 0
