"""diffpipe as an installed wheel: flows and tasks under the ``diffpipe`` name, configs and
deployments as package data, ``diffpipe run --config quickstart`` from a fresh virtual environment
outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion_core", "flows", "tasks", "configs", "deployments")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (a build leaves its work files beside them)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", *PACKAGES):
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = dist.glob("diffpipe-*.whl")
    return found


def test_the_wheel_holds_the_packages_and_their_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "diffpipe/flows/cli.py",
        "diffpipe/flows/pipeline.py",
        "diffpipe/tasks/steps.py",
        "diffpipe/tasks/mlflow_model.py",
        "diffpipe/configs/quickstart.yaml",
        "diffpipe/configs/shapes_text.yaml",
        "diffpipe/configs/clip/tiny-clip.json",
        "diffpipe/deployments/prefect.yaml",
        "diffpipe/deployments/prefect.remote.yaml",
        "diffpipe/deployments/kubernetes-job-template.json",
        "diffpipe/deployments/docker-job-template.json",
        "diffusion_core/pipeline/stages/train.py",
        "diffusion_core/py.typed",
    ):
        assert expected in names, expected
    # No top-level `flows` or `tasks` package to clash with the PyPI distributions of that name.
    assert not [n for n in names if n.startswith(("flows/", "tasks/", "configs/"))]


@pytest.mark.slow
@pytest.mark.scenario  # a minute or more: make test-scenarios
def test_quickstart_runs_from_a_fresh_venv_outside_the_repository(wheel: Path, tmp_path: Path):
    """A fresh venv with diffpipe from the wheel only (its dependencies are the test
    environment's, seen through a path file that runs none of that environment's own hooks, so
    the repository's editable install stays out of sight)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
        "DIFFPIPE_HOME": str(tmp_path / "home"),
        "PYTHONPATH": "",
    }
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import diffusion_core, diffpipe.flows; "
            "print(diffusion_core.__file__, diffpipe.flows.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    ).stdout
    assert str(REPO) not in where and str(venv) in where
    quick = [
        "train.steps=60",
        "train.checkpoint_every=60",
        "pipeline.num_samples=24",
        "pipeline.shards=1",
        "evaluation.interval_draws=5",
        "pipeline.watermark.enabled=false",
    ]
    run = subprocess.run(
        [
            str(venv / "bin" / "diffpipe"),
            "run",
            "--config",
            "quickstart",
            *[arg for s in quick for arg in ("--set", s)],
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "model: quickstart v1" in run.stdout and "report: file://" in run.stdout
    assert (tmp_path / "home" / "artefacts").is_dir()
