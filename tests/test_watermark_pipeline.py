"""The nightly flow with pipeline.watermark enabled, under prefect_test_harness: the published
images carry the registered version, the quarantined ones do not, the key stays out of logs."""

from __future__ import annotations

import asyncio
import copy

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffusion_core import watermark as wm
from diffusion_core.io import psnr
from diffusion_core.pipeline.store import ArtefactStore, default_root
from tests.conftest import TINY
from tests.test_pipeline import _logs, _task_runs

pytestmark = pytest.mark.slow

SECRET = "pipeline-test-watermark-secret"


def test_nightly_publishes_marked_images(harness, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_WM_KEY", SECRET)
    cfg = copy.deepcopy(TINY)
    cfg["name"] = "tiny-wm"
    cfg["data"]["image_size"] = 16
    cfg["model"]["attention_resolutions"] = [8]
    cfg["train"].update(steps=4, num_threads=2)
    cfg["sample"] = {"sampler": "ddim", "steps": 3, "batch_size": 64}
    cfg["pipeline"] = {
        "num_samples": 24,
        "shards": 1,
        "watermark": {"enabled": True, "key_env": "TEST_WM_KEY"},
    }
    path = tmp_path / "wm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from diffpipe.flows.pipeline import nightly

    state = nightly(config=str(path), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    names = [tr.name for tr in asyncio.run(_task_runs(state.state_details.flow_run_id))]
    assert any(n.startswith("watermark") for n in names), names

    key = wm.load_key(key_env="TEST_WM_KEY")
    version = summary["model"]["version"]
    mark = summary["watermark"]
    assert mark["marked"] == summary["samples"]["published"] > 0
    assert (mark["model_version"], mark["key_id"]) == (version, key.key_id)

    store = ArtefactStore(default_root())
    run = f"runs/{summary['run_id']}"
    assert mark["prefix"] == f"{run}/published"
    local = tmp_path / "published"
    store.get_dir(f"{run}/published", local)
    published = load_file(local / "published.safetensors")["images"]
    assert len(published) == summary["samples"]["published"]
    expected = wm.Payload.for_model("tiny-wm", version)
    assert all(r.payload == expected for r in wm.decode(published, key))
    # The filter's published set (unmarked) is the one that was marked; quarantine is not.
    store.get_dir(f"{run}/safety", tmp_path / "safety")
    filtered = load_file(tmp_path / "safety" / "published.safetensors")["images"]
    assert 0 < psnr(filtered, published) < float("inf")
    quarantine = load_file(tmp_path / "safety" / "quarantine" / "images.safetensors")["images"]
    assert not any(r.marked for r in wm.decode(quarantine, key))
    pngs = sorted(local.glob("*.png"))
    assert len(pngs) == len(published)
    meta = wm.read_png_provenance(pngs[0])
    assert meta == wm.Provenance("tiny-wm", version, summary["run_id"], key.key_id)
    assert torch.equal(wm.load_image(pngs[0])[0], published[0])

    # The key is in no log line, no MLflow param and no stored file.
    logs = asyncio.run(_logs(state.state_details.flow_run_id))
    assert all(SECRET not in r.message for r in logs)
    assert SECRET not in str(mlflow.get_run(summary["run_id"]).data.params)
    assert all(SECRET.encode() not in p.read_bytes() for p in local.rglob("*") if p.is_file())
