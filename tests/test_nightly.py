"""The nightly loop night after night: new data is seen, promotion stays fair across data
changes and obeys its guardrails, a night can start from the champion, runs on one home take
turns, and each registered version installs and predicts on its own."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from diffusion_core.config import DataConfig


def noise_png(seed: int, size: int = 10) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return out.getvalue()


def image_folder(root: Path, count: int, *, start: int = 0) -> Path:
    """``count`` PNGs in two class folders (`a` and `b`)."""
    for i in range(start, start + count):
        path = root / ("a" if i % 2 else "b") / f"img-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(noise_png(i))
    return root


# ----------------------------------------------------------------------------------------------
# Data identity from content.


def prepare_twice_flow():
    from diffpipe.tasks import steps
    from prefect import flow

    @flow
    def prepare(data: DataConfig, root: str) -> tuple[dict, bool]:
        ref, cached = steps.prepare_dataset_cached(data, root)
        return {"sha256": ref.sha256, "n": ref.num_train + ref.num_holdout}, cached

    return prepare


def test_new_changed_or_deleted_files_give_a_new_dataset(harness, tmp_path) -> None:
    folder = image_folder(tmp_path / "images", 20)
    data = DataConfig(kind="folder", root=str(folder), image_size=8, holdout_fraction=0.2)
    prepare, root = prepare_twice_flow(), str(tmp_path / "store")

    first, cached = prepare(data, root)
    assert (cached, first["n"]) == (False, 20)
    assert prepare(data, root) == (first, True)  # same contents: Cached

    (folder / "a" / "img-0100.png").write_bytes(noise_png(100))  # a new image
    added, cached = prepare(data, root)
    assert not cached and added["n"] == 21 and added["sha256"] != first["sha256"]

    (folder / "b" / "img-0002.png").write_bytes(noise_png(999))  # same name, new pixels
    os.utime(folder / "b" / "img-0002.png", (1, 1))
    changed, cached = prepare(data, root)
    assert not cached and changed["n"] == 21 and changed["sha256"] != added["sha256"]

    (folder / "a" / "img-0100.png").unlink()
    deleted, cached = prepare(data, root)
    assert not cached and deleted["n"] == 20
    assert prepare(data, root) == (deleted, True)


def test_the_fingerprint_of_a_folder_on_s3_follows_its_objects(s3_for_data) -> None:
    import s3fs

    from diffusion_core.data import source_fingerprint

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_for_data)
    fs.mkdir("nightly-data")
    fs.pipe({f"nightly-data/set/a/{i}.png": noise_png(i) for i in range(4)})
    data = DataConfig(kind="folder", root="s3://nightly-data/set", image_size=8)
    first = source_fingerprint(data)
    assert source_fingerprint(data) == first
    fs.pipe({"nightly-data/set/a/9.png": noise_png(9)})
    added = source_fingerprint(data)
    fs.pipe({"nightly-data/set/a/0.png": noise_png(50)})  # same key, new content (new ETag)
    changed = source_fingerprint(data)
    fs.rm("nightly-data/set/a/9.png")
    deleted = source_fingerprint(data)
    assert len({first, added, changed, deleted}) == 4
    fs.pipe({"nightly-data/set/a/0.png": noise_png(0)})  # the original bytes again
    assert source_fingerprint(data) == first  # S3 ETags follow the content


def test_a_missing_data_root_is_named(tmp_path) -> None:
    from diffusion_core.data import DatasetError, source_fingerprint

    with pytest.raises(DatasetError, match=r"nowhere: data.root not found"):
        source_fingerprint(DataConfig(kind="folder", root=str(tmp_path / "nowhere")))
    assert source_fingerprint(DataConfig(kind="digits")) == "builtin:digits"


@pytest.fixture
def s3_for_data(monkeypatch, tmp_path):
    from tests.conftest import moto_s3

    with moto_s3(monkeypatch, tmp_path / "aws") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint


# ----------------------------------------------------------------------------------------------
# Promotion: guardrails, and evaluations that differ only in their reference data.


def evaluation(fid: float, **metrics: float) -> dict:
    record = {k: "x" for k in ("engine", "extractor", "extractor_sha256", "reference_split")}
    record |= {"reference_sha256": "data-1", "num_samples": 100, "num_reference": 30}
    record |= {"sampler": "ddim", "steps": 10, "nfe": 10, "spacing": "leading", "eta": 0.0}
    record |= {"guidance_scale": 1.5}
    base = {"precision": 0.8, "recall": 0.7, "conditional_accuracy": 0.95}
    base |= {"memorisation_flag_rate": 0.0, "safety_flag_rate": 0.01}
    fids = {"fid": fid, "fid_low": fid - 1, "fid_high": fid + 1}
    return {"metrics": fids | base | metrics, "record": record}


def test_guardrails_keep_a_lower_fid_that_costs_recall_or_memorises():
    from diffusion_core.config import PromotionConfig
    from diffusion_core.evaluation.promotion import Champion, decide

    champion = Champion("3", evaluation(10.0))
    better = decide(evaluation(5.0), champion)
    assert better.promote and [v.rule for v in better.verdicts] == [
        "fid",
        "precision",
        "recall",
        "conditional_accuracy",
        "memorisation_flag_rate",
        "safety_flag_rate",
    ]
    assert all(v.passed for v in better.verdicts)
    # Recall falls by 0.1 > 0.02: the lower FID is not enough.
    worse_recall = decide(evaluation(5.0, recall=0.6), champion)
    assert not worse_recall.promote
    assert "guardrails failed: recall 0.6 vs 0.7 (fall at most 0.02): FAILED" in worse_recall.reason
    # More memorised samples than allowed.
    copies = decide(evaluation(5.0, memorisation_flag_rate=0.02), champion)
    assert not copies.promote and "memorisation_flag_rate" in copies.reason
    # Inside the tolerance, or with the guardrail off, it is promoted.
    assert decide(evaluation(5.0, recall=0.69), champion).promote
    relaxed = PromotionConfig(recall_drop=None, memorisation_rise=None)
    assert decide(
        evaluation(5.0, recall=0.1, memorisation_flag_rate=0.5), champion, relaxed
    ).promote
    # A metric one side lacks is not judged (an unconditional model has no conditional accuracy).
    bare = evaluation(5.0)
    del bare["metrics"]["conditional_accuracy"]
    verdict = decide(bare, champion)
    assert verdict.promote
    assert [v.passed for v in verdict.verdicts if v.rule == "conditional_accuracy"] == [None]


def test_only_a_new_reference_or_judge_makes_an_evaluation_repeatable():
    from diffusion_core.evaluation.promotion import Champion, decide, reevaluable

    champion = Champion("1", evaluation(10.0))
    new_data = evaluation(5.0)
    new_data["record"] |= {"reference_sha256": "data-2", "extractor_sha256": "judge-2"}
    assert reevaluable(new_data, champion)
    assert "not comparable" in decide(new_data, champion).reason  # until it is evaluated again
    other_sampler = evaluation(5.0)
    other_sampler["record"] |= {"reference_sha256": "data-2", "sampler": "ddpm"}
    assert not reevaluable(other_sampler, champion)
    assert not reevaluable(evaluation(5.0), champion)  # nothing differs: no need
    assert not reevaluable(new_data, Champion("1", None))  # never evaluated: nothing to repeat


# ----------------------------------------------------------------------------------------------
# Warm start.


def test_a_warm_start_begins_at_the_parents_weights_and_refuses_another_network(tmp_path):
    import copy

    from safetensors.torch import load_file

    from diffusion_core.config import parse_config
    from diffusion_core.data import load_dataset
    from diffusion_core.model import ModelCard
    from diffusion_core.training import InitWeights, TrainingError, train
    from tests.conftest import TINY

    cfg = parse_config(copy.deepcopy(TINY))
    data = load_dataset(cfg.data)
    parent = train(cfg, data, tmp_path / "parent", progress=False)
    card = ModelCard.read(parent.checkpoint / "card.json")
    ema = parent.checkpoint / "ema.safetensors"
    init = InitWeights(ema, card, "sha-of-parent", "models:/tiny/1")
    start = train(cfg, data, tmp_path / "child", max_steps=0, progress=False, init=init)
    weights = load_file(start.checkpoint / "weights.safetensors")
    for name, tensor in load_file(ema).items():
        assert torch_equal(weights[name], tensor), name
    # The warm start is part of the training identity: a cold run never resumes it.
    with pytest.raises(TrainingError, match="another model"):
        train(cfg, data, tmp_path / "child", progress=False)
    wider = parse_config(copy.deepcopy(TINY) | {"model": TINY["model"] | {"base_channels": 8}})
    with pytest.raises(TrainingError, match=r"models:/tiny/1 is another network.*base_channels"):
        train(wider, data, tmp_path / "wider", progress=False, init=init)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# ----------------------------------------------------------------------------------------------
# One run at a time.


def test_the_lock_names_the_run_that_holds_it(tmp_path):
    from diffusion_core.pipeline.lock import LockHeld, hold

    lock = tmp_path / "locks" / "m.lock"
    held = r"model 'm' is in use by another run \(run first-night"
    with (
        hold(lock, what="model 'm'", owner={"run": "first-night"}),
        pytest.raises(LockHeld, match=held),
        hold(lock, what="model 'm'", owner={"run": "second"}),
    ):
        pass
    with hold(lock, what="model 'm'", owner={"run": "third"}):  # released: free again
        pass


def _run(home: Path, config: Path, *overrides: str) -> subprocess.Popen[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
        "DIFFPIPE_HOME": str(home),
    }
    command = [sys.executable, "-m", "diffpipe.flows.cli", "run", "--config", str(config)]
    for item in overrides:
        command += ["--set", item]
    return subprocess.Popen(
        command,
        env=env,
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.scenario  # a minute or more: make test-scenarios
def test_two_runs_on_one_home_take_turns(tmp_path):
    """A second run of the same model exits 1 naming the run that holds it, before it touches
    MLflow; a run of another model that would train into the same directory stops at training."""
    import json
    import signal

    import mlflow
    import yaml

    from tests.test_pipeline import PIPELINE_TINY

    home = tmp_path / "home"
    config = tmp_path / "long.yaml"
    long_run = PIPELINE_TINY | {"name": "same", "train": PIPELINE_TINY["train"] | {"steps": 400}}
    config.write_text(yaml.safe_dump(long_run))
    first = _run(home, config)
    try:
        lock = home / "locks" / "same.lock"
        deadline = time.monotonic() + 300
        while not (lock.is_file() and lock.read_text() and list(home.glob("work/train-*.lock"))):
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.3)
        holder = json.loads(lock.read_text())
        second = _run(home, config)
        out = second.communicate(timeout=300)[0]
        assert second.returncode == 1, out
        assert "not started: model 'same'" in out and "in use by another run" in out, out
        assert f"run {holder['run']}" in out and "Traceback" not in out
        # Another name, the same training: the model lock lets it in, the directory lock not.
        other = _run(home, config, "name=other")
        out = other.communicate(timeout=300)[0]
        assert other.returncode == 1, out
        assert "run failed in step train: training directory" in out, out
        assert "in use by another run" in out and "Traceback" not in out
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    # The first run and the other model's; the refused run of the same model made none.
    assert sorted(client.get_experiment(r.info.experiment_id).name for r in runs) == [
        "diffpipe-other",
        "diffpipe-same",
    ]


# ----------------------------------------------------------------------------------------------
# Per-class quality.


def test_per_class_quality_finds_the_class_the_model_gets_wrong():
    import torch

    from diffusion_core.evaluation.quality import class_rows, per_class_scores

    g = torch.Generator().manual_seed(0)
    reference = torch.randn(80, 4, generator=g)
    ref_labels = torch.arange(80) % 2
    generated = torch.randn(80, 4, generator=g)
    gen_labels = torch.arange(80) % 2
    generated[gen_labels == 1] += 3.0  # class 1 drawn far from its references
    scores = per_class_scores(generated, reference, gen_labels, ref_labels, draws=10)
    assert scores["class_fid/1"] > 10 * scores["class_fid/0"]
    for k in (0, 1):
        assert (
            scores[f"class_fid_low/{k}"]
            <= scores[f"class_fid/{k}"]
            <= scores[f"class_fid_high/{k}"]
        )
    assert scores["class_precision/1"] < scores["class_precision/0"]
    rows = class_rows(scores, ["even", "odd"])
    assert [r["class"] for r in rows] == ["even", "odd"] and rows[1]["FID"] == scores["class_fid/1"]
    # A class with too few images either side is left out, not reported as noise.
    few = per_class_scores(generated[:10], reference, gen_labels[:10], ref_labels, draws=5)
    assert few == {}


# ----------------------------------------------------------------------------------------------
# Three nights.


def pattern_folder(root: Path, per_class: int, *, start: int = 0) -> None:
    """Two classes a judge tells apart: light top half (`top`) or light bottom half (`bottom`),
    with noise."""
    import numpy as np

    for i in range(start, start + per_class):
        for name, rows in (("top", slice(0, 5)), ("bottom", slice(5, 10))):
            pixels = np.random.default_rng(i * 2 + (name == "top")).integers(0, 90, (10, 10))
            pixels[rows] += 150
            path = root / name / f"{name}-{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8), "L").save(path)


def night_config(path: Path, folder: Path, **train: object) -> Path:
    import copy

    import yaml

    from tests.conftest import TINY

    cfg = copy.deepcopy(TINY)
    cfg["name"] = "nights"
    cfg["data"] = {"kind": "folder", "root": str(folder), "image_size": 8, "holdout_fraction": 0.25}
    cfg["train"] |= {"steps": 16, "checkpoint_every": 8, "log_every": 4, "num_threads": 2} | train
    cfg["sample"] = {"sampler": "ddim", "steps": 4, "guidance_scale": 1.5, "batch_size": 64}
    cfg["pipeline"] = {"num_samples": 40, "shards": 1}
    cfg["evaluation"] = {
        "interval_draws": 5,
        "sweep": [{"sampler": "ddim", "steps": 2}, {"sampler": "ddpm", "steps": 10}],
        "sweep_num_samples": 16,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def flat_folder(root: Path, count: int) -> Path:
    """``count`` PNGs straight in ``root`` (no class sub-folders: no labels), one unreadable file
    and a captions file with a row that names no image."""
    pattern_folder(root / "tmp", count // 2)
    root.mkdir(parents=True, exist_ok=True)
    for path in sorted((root / "tmp").rglob("*.png")):
        path.rename(root / path.name)
    for folder in sorted((root / "tmp").iterdir()):
        folder.rmdir()
    (root / "tmp").rmdir()
    (root / "broken.png").write_bytes(b"not a png")
    (root / "captions.csv").write_text("file,caption\nghost.png,never there\n")
    return root


@pytest.mark.slow
def test_a_flat_folder_runs_end_to_end(harness, tmp_path):
    """Images without class sub-folders: an unconditional model, memorisation in pixel space,
    FID/KID/precision/recall on a judge of the images' turn, no conditional accuracy; the two
    items left out of the source are counted in the summary, MLflow and the report."""
    import diffpipe.flows.pipeline as pipeline
    import mlflow

    folder = flat_folder(tmp_path / "flat", 32)
    config = night_config(tmp_path / "flat.yaml", folder, steps=8, checkpoint_every=8)
    overrides = {"name": "flat", "evaluation.sweep": [], "pipeline.num_samples": 24}
    summary = pipeline.nightly(config=str(config), overrides=overrides)
    assert summary["dataset"]["skipped"] == 2
    assert summary["samples"]["published"] >= 4
    metrics = summary["metrics"]
    for key in ("fid", "kid", "precision", "recall", "judge_holdout_accuracy"):
        assert key in metrics, key
    assert "conditional_accuracy" not in metrics and "inception_score" not in metrics
    assert "memorisation_flag_rate" in metrics  # it ran (in pixel space), not failed closed
    safety = json.loads(
        Path(summary["report_uri"].removeprefix("file://"))
        .parents[1]
        .joinpath("safety", "summary.json")
        .read_text()
    )
    assert safety["failures"] == {}
    memorisation = next(d for d in safety["safety"]["detectors"] if d["name"] == "memorisation")
    assert memorisation["params"]["feature_space"] is False
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.metrics["dataset/skipped"] == 2
    html = Path(summary["report_uri"].removeprefix("file://")).read_text()
    assert "Data: 2 item(s) of the source were left out" in html


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("model.class_conditional=true", "model.class_conditional"),
        (
            'safety.detectors=[{"name": "memorisation", "params": {"feature_space": true}}]',
            "safety.detectors[0].params.feature_space",
        ),
    ],
)
def test_settings_that_need_labels_are_refused_before_training(
    harness, tmp_path, capsys, setting, key
):
    from diffpipe.flows.cli import main

    folder = flat_folder(tmp_path / "flat", 8)
    config = night_config(tmp_path / "flat.yaml", folder)
    name = f"needs-labels-{key.split('.')[0]}"
    code = main(["run", "--config", str(config), "--set", f"name={name}", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error in step prepare_dataset" in err and f"{key}: true" in err and str(folder) in err
    import mlflow

    client = mlflow.MlflowClient()
    assert client.search_model_versions(f"name = '{name}'") == []
    (run,) = mlflow.search_runs(experiment_names=[f"diffpipe-{name}"], output_format="list")
    assert run.info.status == "FAILED"
    assert client.get_metric_history(run.info.run_id, "train/loss") == []  # never trained


def champions(client, name: str) -> list[str]:
    model = client.get_registered_model(name)
    return [str(v) for alias, v in model.aliases.items() if alias == "champion"]


@pytest.mark.slow
@pytest.mark.scenario
def test_three_nights(harness, tmp_path, monkeypatch):
    """Night 1 trains and becomes champion. Night 2 finds new images: it trains on them, the
    champion is evaluated again on night 2's reference, and the guardrails decide. Night 3 starts
    from the champion's weights. One champion at every point; every version installs and
    predicts in a fresh environment that has only MLflow and torch."""
    import json

    import diffpipe.flows.pipeline as pipeline
    import mlflow
    from diffpipe.tasks import tracking

    rejected: list[dict] = []
    monkeypatch.setattr(pipeline, "emit_rejected", lambda m, t, d: rejected.append(d))
    client = mlflow.MlflowClient()
    folder = tmp_path / "images"
    pattern_folder(folder, 24)

    # Night 1.
    one = pipeline.nightly(config=str(night_config(tmp_path / "n1.yaml", folder)))
    assert one["promotion"]["promoted"] and one["model"]["version"] == "1"
    assert champions(client, "nights") == ["1"]

    # Night 2: new images arrived.
    pattern_folder(folder, 8, start=24)
    two = pipeline.nightly(config=str(night_config(tmp_path / "n2.yaml", folder)))
    assert not two["dataset"]["cached"] and two["dataset"]["sha256"] != one["dataset"]["sha256"]
    assert two["training"]["steps_run"] == 16  # trained on the new data, not reused
    decision = two["promotion"]
    assert decision["champion_reevaluated"] and decision["previous_champion"] == "1"
    assert [r["rule"] for r in decision["rules"]][:3] == ["fid", "precision", "recall"]
    assert two["champion_evaluation"] is not None
    v1 = client.get_model_version("nights", "1")
    now = json.loads(v1.tags["diffpipe.evaluation"])
    before = json.loads(v1.tags["diffpipe.evaluation.previous"])
    assert (
        now["record"]["reference_sha256"]
        == two["dataset"]["sha256"]
        == two["record"]["reference_sha256"]
    )
    assert before["record"]["reference_sha256"] == one["dataset"]["sha256"]
    assert (decision["promoted"], bool(rejected)) in ((True, False), (False, True))
    assert champions(client, "nights") == ["2" if decision["promoted"] else "1"]
    report = Path(two["report_uri"].removeprefix("file://")).parent
    assert (report / "img" / "side_by_side.png").is_file()
    assert "Champion and challenger" in (report / "index.html").read_text()

    # Night 3: warm start from the champion.
    champion = champions(client, "nights")[0]
    three = pipeline.nightly(
        config=str(night_config(tmp_path / "n3.yaml", folder, init_from="champion"))
    )
    assert three["parent"] == f"models:/nights/{champion}"
    assert three["training"]["steps_run"] == 16  # a new training identity: the parent's weights
    v3 = client.get_model_version("nights", "3")
    assert v3.tags["diffpipe.parent"] == f"models:/nights/{champion}"
    assert not three["promotion"]["champion_reevaluated"]  # same reference as the champion's now
    assert len(champions(client, "nights")) == 1
    # The sweep's cheapest setting became version 3's default sampling.
    sampling = json.loads(v3.tags["diffpipe.sampling"])
    assert (sampling["sampler"], sampling["steps"]) in {("ddim", 2), ("ddpm", 10)}
    loaded = tracking.load_registered("models:/nights/3")
    assert loaded.unwrap_python_model().card.sampling.steps == sampling["steps"]

    installs_and_predicts(tmp_path, ["1", "2", "3"])


def installs_and_predicts(tmp_path: Path, versions: list[str]) -> None:
    """A fresh venv with MLflow and torch from this machine's package store; each version's own
    requirements.txt installs the rest, its code comes from the model's artifacts."""
    from importlib import metadata

    import mlflow

    venv = tmp_path / "fresh"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        pip = [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
        ]
        base = [f"torch=={metadata.version('torch')}", f"mlflow=={metadata.version('mlflow')}"]
        installed = subprocess.run([*pip, *base], timeout=1200, capture_output=True, text=True)
        assert installed.returncode == 0, installed.stderr[-3000:]  # pip's words, e.g. disk full
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import diffusion_core"],
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
            capture_output=True,
        )
        assert probe.returncode != 0  # nothing of this repository in the fresh environment
        client = mlflow.MlflowClient()
        for version in versions:
            source = client.get_model_version_download_uri("nights", version)
            local = Path(
                mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / version))
            )
            requirements = (local / "requirements.txt").read_text()
            assert "diffpipe" not in requirements and "torch==" in requirements
            subprocess.run([*pip, "-r", str(local / "requirements.txt")], check=True, timeout=1200)
            script = (
                "import mlflow, sys; m = mlflow.pyfunc.load_model(sys.argv[1]); "
                "print(m.predict({'num_samples': 2, 'steps': 3, 'seed': 1}).shape)"
            )
            out = subprocess.run(
                [str(venv / "bin" / "python"), "-c", script, str(local)],
                cwd=tmp_path,
                env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert out.returncode == 0, out.stderr[-3000:]
            assert out.stdout.strip().splitlines()[-1] == "(2, 8, 8, 1)", out.stdout
    finally:  # torch and MLflow take gigabytes: never leave them behind, failed or not
        shutil.rmtree(venv, ignore_errors=True)
