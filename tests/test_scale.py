"""Beyond one process: the device every step runs on, training in several processes through the
flow, datasets read as they are needed, and training that resumes on any host from the store."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from diffusion_core.config import ConfigError, parse_config
from diffusion_core.distributed import DeviceError, inference_dtype, resolve_device
from tests.conftest import TINY, free_port

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Devices.


def test_the_device_setting_resolves_or_names_what_is_missing() -> None:
    assert resolve_device("auto") == torch.device("cpu")  # no CUDA on this machine
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:3"):
            with pytest.raises(DeviceError, match=rf"runtime.device='{spec}'.* 0 CUDA device"):
                resolve_device(spec)
    with pytest.raises(ConfigError, match=r"runtime\.device"):
        parse_config({"runtime": {"device": "gpu"}})
    assert inference_dtype(torch.device("cpu")) is None
    assert inference_dtype(torch.device("cuda")) is torch.bfloat16
    assert inference_dtype(torch.device("cpu"), "bf16") is torch.bfloat16


def test_cuda_spreads_dask_workers_and_torchrun_ranks_over_the_gpus(monkeypatch) -> None:
    """``cuda`` is each process's own GPU: LOCAL_RANK under torchrun, the worker's index on a
    local Dask cluster (4 workers on 2 GPUs: 0, 1, 0, 1), never all on cuda:0."""
    from dask.distributed import Client, LocalCluster

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda:0")  # not in a worker
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda:1")
    monkeypatch.delenv("LOCAL_RANK")
    with (
        LocalCluster(n_workers=4, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        placed = {
            name: client.submit(
                lambda: str(resolve_device("cuda")), workers=[address], pure=False
            ).result()
            for address, name in (
                (addr, info["name"]) for addr, info in client.scheduler_info()["workers"].items()
            )
        }
    assert placed == {0: "cuda:0", 1: "cuda:1", 2: "cuda:0", 3: "cuda:1"}


def test_bf16_sampling_runs_under_autocast_and_stays_close(tmp_path: Path) -> None:
    """runtime.precision: bf16 changes where the network's matmuls run, not what it samples."""
    from diffusion_core.data import load_dataset, split_dataset
    from diffusion_core.sampling import SampleRequest, generate
    from diffusion_core.training import train

    raw = copy.deepcopy(TINY) | {"train": TINY["train"] | {"steps": 4}}
    cfg = parse_config(raw)
    train_set, _ = split_dataset(load_dataset(cfg.data), holdout_fraction=0.2, seed=0)
    result = train(cfg, train_set, tmp_path, progress=False)
    from diffusion_core.model import load_model

    net, card = load_model(result.checkpoint)
    request = SampleRequest(num_samples=6, steps=3, seed=2)
    seen: list[torch.dtype] = []
    net.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fp32 = generate(net, card, request).images
    bf16 = generate(net, card, request, dtype=torch.bfloat16).images
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    assert (fp32.int() - bf16.int()).abs().float().mean() < 8  # grey levels, of 255


# ----------------------------------------------------------------------------------------------
# Streaming data.


@pytest.mark.scenario  # about 20 s: make test-scenarios
def test_training_reads_a_dataset_larger_than_its_memory_bound(tmp_path: Path) -> None:
    """A training process's peak resident memory grows far less than the dataset on disk."""
    shards, per_shard, side = 6, 2000, 64  # 6 x 2000 x 3 x 64 x 64 bytes = 295 MB on disk
    folder = tmp_path / "shards"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(shards):
        images = torch.randint(0, 256, (per_shard, 3, side, side), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 4, (per_shard,), generator=g)
        save_file({"images": images, "labels": labels}, folder / f"train-{k:05d}.safetensors")
        del images
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    bound = on_disk // 4
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from pathlib import Path
        import torch
        from diffusion_core.config import parse_config
        from diffusion_core.data.sharded import ShardedDataset
        from diffusion_core.training import train

        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

        files = sorted(Path({str(folder)!r}).glob("train-*.safetensors"))
        data = ShardedDataset(files, class_names=list("abcd"), captions=None, sha256="s",
                              source="shards")
        cfg = parse_config({{
            "data": {{"image_size": {side}}},
            "model": {{"base_channels": 8, "channel_mults": [1, 2], "attention_resolutions": [],
                       "num_heads": 1}},
            "diffusion": {{"num_steps": 50}},
            "train": {{"steps": 30, "batch_size": 8, "warmup_steps": 1, "log_every": 10,
                       "checkpoint_every": 30, "num_threads": 1, "precision": "fp32"}},
        }})
        # Warm up (model, optimizer, kernels, allocators) on 16 items in memory, same shapes.
        from diffusion_core.data import ImageDataset
        warm = ImageDataset(images=data.read(torch.arange(16)), labels=data.labels[:16],
                            class_names=list("abcd"))
        train(cfg, warm, {str(tmp_path / "warm")!r}, progress=False)
        before = peak()
        train(cfg, data, {str(tmp_path / "run")!r}, progress=False)
        print(json.dumps({{"before": before, "after": peak(), "items": len(data)}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["items"] == shards * per_shard
    growth = figures["after"] - figures["before"]
    assert on_disk > 3 * bound and growth < bound, (growth, bound, on_disk)


def test_a_sharded_dataset_reads_the_items_it_was_given(tmp_path: Path) -> None:
    from diffusion_core.data.sharded import ShardedDataset

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (25, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(25) % 3
    for k, (a, b) in enumerate([(0, 10), (10, 11), (11, 25)]):
        save_file({"images": images[a:b], "labels": labels[a:b]}, tmp_path / f"s{k}.safetensors")
    data = ShardedDataset(
        sorted(tmp_path.glob("s*.safetensors")),
        class_names=list("abc"),
        captions=None,
        sha256="x",
        source="s",
    )
    assert len(data) == 25 and data.item_shape == (1, 4, 4)
    assert torch.equal(data.labels, labels)
    order = torch.tensor([24, 0, 10, 9, 11, 3, 10])
    assert torch.equal(data.read(order), images[order])
    with pytest.raises(IndexError):
        data.read(torch.tensor([25]))


# ----------------------------------------------------------------------------------------------
# The flow: several training processes, and resuming from the store on another host.

FLOW_TINY = copy.deepcopy(TINY)
FLOW_TINY["train"].update(
    steps=12, batch_size=16, checkpoint_every=4, log_every=4, num_threads=1, precision="fp32"
)
FLOW_TINY["pipeline"] = {"num_samples": 24, "shards": 1}
FLOW_TINY["evaluation"] = {"interval_draws": 5}


def config_file(path: Path, **sections: dict) -> Path:
    cfg = copy.deepcopy(FLOW_TINY)
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


def checkpoint_weights(root: Path, summary: dict) -> dict[str, torch.Tensor]:
    prefix = summary["checkpoint_url"].removeprefix("file://")
    return load_file(Path(prefix) / "weights.safetensors")


@pytest.mark.slow
def test_the_flow_trains_in_two_processes_as_in_one(harness, tmp_path, monkeypatch) -> None:
    from diffpipe.flows.pipeline import nightly

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    weights = []
    for nproc in (1, 2):
        home = tmp_path / f"home-{nproc}"
        monkeypatch.setenv("DIFFPIPE_HOME", str(home))
        config = config_file(
            tmp_path / f"ddp-{nproc}.yaml",
            train={"nproc": nproc},
            pipeline={"artefact_root": str(home / "artefacts")},
        )
        summary = nightly(config=str(config), overrides={"name": f"ddp-{nproc}"}, evaluate=False)
        assert summary["devices"] == {"train": "cpu", "train_processes": nproc}
        assert summary["training"] == {"steps": 12, "steps_run": 12}
        weights.append(checkpoint_weights(home, summary))
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=1e-5, rtol=1e-4)
    assert not list(scratch.glob("diffpipe-train-*"))  # the processes' exchange folder is gone


@pytest.mark.slow
def test_a_failing_rank_is_reported_and_leaves_no_exchange_folder(tmp_path, monkeypatch) -> None:
    """Both torchrun processes fail on a dataset reference that is not one: the error is the
    rank's own, and the folder the processes exchanged their spec and errors through is gone."""
    import diffusion_core.pipeline.stages.train as stage

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = stage.TrainSpec(TINY, "{not json", f"file://{tmp_path / 'store'}", str(tmp_path), "")
    with pytest.raises(stage.TrainingError, match=r"distributed training failed: rank \d: "):
        stage._torchrun(spec, 2, stage.Nodes())
    assert not list(tmp_path.glob("diffpipe-train-*"))


def test_only_torchruns_rank_0_writes_the_result(tmp_path, monkeypatch) -> None:
    """Training leaves the process group before the result is written, so the process group can
    no longer tell the ranks apart: the result is rank 0's by torchrun's RANK, written whole
    (two ranks writing one file interleaved their JSON)."""
    from types import SimpleNamespace

    import diffusion_core.pipeline.stages.train as stage
    from diffusion_core.config import parse_config
    from tests.conftest import TINY, card_for

    card = card_for(parse_config(TINY))
    done = SimpleNamespace(
        checkpoint=tmp_path / "ckpt", card=card, steps=6, images_per_second=1.0, history=[]
    )
    monkeypatch.setattr(stage, "run_training", lambda *a, **k: done)
    monkeypatch.setattr(stage.DatasetRef, "from_json", staticmethod(lambda *a, **k: None))
    for rank in (1, 0):
        out = tmp_path / f"out-{rank}"
        out.mkdir()
        store = f"file://{tmp_path / 'store'}"
        stage.TrainSpec(TINY, "{}", store, str(tmp_path), str(out)).write(tmp_path / "spec.json")
        monkeypatch.setenv("RANK", str(rank))
        stage.main(str(tmp_path / "spec.json"))
        written = sorted(p.name for p in out.iterdir())
        assert written == ([] if rank else ["result.json"])
    result = json.loads((tmp_path / "out-0" / "result.json").read_text())
    assert result["steps"] == 6 and result["card"] == card.model_dump(mode="json")


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_process(tmp_path, monkeypatch) -> None:
    """Node 0 is the train step, node 1 is `diffpipe train-node` in another process; they meet
    in torchrun's c10d rendezvous on 127.0.0.1 and end with one process's weights."""
    from diffusion_core.config import load_config
    from diffusion_core.pipeline.stages.dataset import prepare_dataset
    from diffusion_core.pipeline.stages.train import train_model
    from diffusion_core.pipeline.store import ArtefactStore

    cfg = load_config(config_file(tmp_path / "nodes.yaml"), {"train.nproc": 1})
    stores = {n: ArtefactStore(str(tmp_path / f"store-{n}")) for n in ("one", "two")}
    ckpt = {}
    data = prepare_dataset(cfg.data, stores["one"])
    ckpt["one"] = train_model(
        cfg, data, stores["one"], checkpoint_prefix="ckpt", work_dir=tmp_path / "w-one"
    )
    assert ckpt["one"].processes == 1

    nodes = {
        "DIFFPIPE_NNODES": "2",
        "DIFFPIPE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "DIFFPIPE_RDZV_ID": "nodes-test",
    }
    data = prepare_dataset(cfg.data, stores["two"])
    other = subprocess.Popen(
        [
            *(sys.executable, "-m", "diffpipe.flows.cli", "train-node", "--timeout", "300"),
            *("--artefact-root", stores["two"].root, "--work-dir", str(tmp_path / "w-node1")),
        ],
        env={**os.environ, **nodes, "DIFFPIPE_NODE_RANK": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for key, value in nodes.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DIFFPIPE_NODE_RANK", "0")
        ckpt["two"] = train_model(
            cfg, data, stores["two"], checkpoint_prefix="ckpt", work_dir=tmp_path / "w-two"
        )
        out, _ = other.communicate(timeout=300)
    finally:
        other.kill()
    assert other.returncode == 0, out[-3000:]
    assert ckpt["two"].processes == 2 and ckpt["two"].steps_run == 12
    assert not stores["two"].exists("training/nodes/nodes-test/spec.json")  # removed at the end
    one, two = (load_file(tmp_path / f"store-{n}" / "ckpt" / "weights.safetensors") for n in ckpt)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)


def _diffpipe(home: Path, config: Path, *extra: str) -> subprocess.Popen[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
        "DIFFPIPE_HOME": str(home),
    }
    command = [sys.executable, "-m", "diffpipe.flows.cli", "run", "--config", str(config)]
    return subprocess.Popen(
        [*command, *extra],
        env=env,
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: kill -9 takes its Prefect server too
    )


@pytest.mark.slow
@pytest.mark.scenario  # a minute or more: make test-scenarios
def test_a_killed_run_resumes_from_the_store_on_a_fresh_host(tmp_path) -> None:
    """kill -9 during training, the worker's disk wiped (another host): the next run resumes
    from the newest checkpoint in the store and ends with the weights of an uninterrupted run."""
    steps = {"steps": 40, "checkpoint_every": 8}
    store = tmp_path / "store"
    config = config_file(
        tmp_path / "resume.yaml", train=steps, pipeline={"artefact_root": str(store)}
    )
    home = tmp_path / "home"
    home.mkdir()
    run = _diffpipe(home, config, "--set", "name=resume")
    deadline = time.monotonic() + 600
    while not list(store.glob("training/*/step-*/manifest.json")):
        assert run.poll() is None, run.stdout.read() if run.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint reached the store"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    stored = sorted(store.glob("training/*/step-*/manifest.json"))
    resumed_at = int(stored[-1].parent.name.removeprefix("step-"))
    assert resumed_at < 40
    shutil.rmtree(home)  # the next run is on a host that never saw this one
    home.mkdir()
    again = _diffpipe(
        home, config, "--set", "name=resume", "--summary-out", str(tmp_path / "s.json")
    )
    output, _ = again.communicate(timeout=900)
    assert again.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["training"] == {"steps": 40, "steps_run": 40 - resumed_at}
    # The same training straight through, elsewhere.
    other_store, other_home = tmp_path / "straight-store", tmp_path / "straight-home"
    other_home.mkdir()
    straight_config = config_file(
        tmp_path / "straight.yaml", train=steps, pipeline={"artefact_root": str(other_store)}
    )
    straight = _diffpipe(
        other_home,
        straight_config,
        "--set",
        "name=straight",
        "--summary-out",
        str(tmp_path / "t.json"),
    )
    output, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, output[-3000:]
    reference = json.loads((tmp_path / "t.json").read_text())
    a, b = checkpoint_weights(store, summary), checkpoint_weights(other_store, reference)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# Bulk sampling on Dask.


@pytest.mark.slow
@pytest.mark.scenario  # about 20 s: make test-scenarios
def test_sampling_on_a_dask_cluster_gives_the_same_samples_and_fid(harness, tmp_path) -> None:
    """The sampling shards on a 2-worker LocalCluster (processes, loopback only): the same
    published samples and the same FID as Prefect's thread runner, for the same seeds."""
    from diffpipe.flows.pipeline import nightly

    results = {}
    for kind in ("threads", "dask"):
        runner = {"kind": kind, "n_workers": 2, "threads_per_worker": 1}
        config = config_file(
            tmp_path / f"{kind}.yaml",
            pipeline={"num_samples": 24, "shards": 2},
            runtime={"task_runner": runner},
        )
        summary = nightly(config=str(config), overrides={"name": f"bulk-{kind}"})
        published = Path(summary["report_uri"].removeprefix("file://")).parents[1] / "safety"
        results[kind] = (summary, load_file(published / "published.safetensors"))
    (threads, a), (dask, b) = results["threads"], results["dask"]
    assert threads["devices"]["sample"] == dask["devices"]["sample"] == "cpu"
    here = f"{os.uname().nodename}:{os.getpid()}"
    assert threads["sample_workers"] == [here]  # the flow's own process
    assert len(dask["sample_workers"]) == 2 and here not in dask["sample_workers"]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["seeds"], b["seeds"])
    assert threads["metrics"]["fid"] == dask["metrics"]["fid"]


@pytest.mark.slow
@pytest.mark.scenario  # a minute or more: make test-scenarios
def test_the_prepare_cache_is_shared_by_hosts_that_share_the_store(tmp_path) -> None:
    """Two hosts (two DIFFPIPE_HOMEs, so two Prefect servers and databases) and one store: the
    second host's prepare step is served from the cache the first one left in the store."""
    store = tmp_path / "store"
    config = config_file(tmp_path / "shared.yaml", pipeline={"artefact_root": str(store)})
    cached = []
    for host in ("a", "b"):
        home = tmp_path / host
        home.mkdir()
        out = tmp_path / f"{host}.json"
        run = _diffpipe(home, config, "--set", "name=shared", "--summary-out", str(out))
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, output[-3000:]
        cached.append(json.loads(out.read_text())["dataset"]["cached"])
    assert cached == [False, True]
    assert list((store / "prefect-cache").iterdir())
