from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_core import config, model, training
from diffusion_core import ema as ema_module
from diffusion_core.batches import BatchSchedule
from diffusion_core.config import parse_config
from diffusion_core.data import ImageDataset
from diffusion_core.ema import EMA
from diffusion_core.model import ModelCard, latest_checkpoint, load_model, write_checkpoint
from diffusion_core.parameterization import EDMPrediction, prediction_for
from diffusion_core.sampling import SampleRequest, generate
from diffusion_core.training import TrainingError, train
from tests.conftest import TINY, card_for, free_port

REPO = Path(__file__).resolve().parents[1]


def toy_dataset(n: int = 64, size: int = 8, classes: int = 3) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageDataset(
        images=images,
        labels=labels,
        class_names=[str(i) for i in range(classes)],
        captions=None,
        source="toy",
        skipped=0,
    )


def weights(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(ckpt / name)


def test_resume_equals_straight_run(tmp_path, tiny_config_dict):
    """N steps, stop, resume for N more gives the same weights and EMA as 2N straight."""
    tiny_config_dict["train"].update(steps=6, checkpoint_every=100, label_dropout=0.3)
    tiny_config_dict["model"]["dropout"] = 0.1  # exercises the global RNG state too
    cfg = parse_config(tiny_config_dict)
    data = toy_dataset()
    straight = train(cfg, data, tmp_path / "a", progress=False)
    first = train(cfg, data, tmp_path / "b", max_steps=3, progress=False)
    assert first.steps == 3 and first.checkpoint.name == "step-0000003"
    second = train(cfg, data, tmp_path / "b", progress=False)
    assert second.steps == 3
    for name in ("weights.safetensors", "ema.safetensors"):
        a, b = weights(straight.checkpoint, name), weights(second.checkpoint, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    # A third call has nothing left to do and returns the same checkpoint.
    again = train(cfg, data, tmp_path / "b", progress=False)
    assert again.steps == 0 and again.checkpoint == second.checkpoint


def test_resume_refuses_another_config(tmp_path, tiny_config_dict):
    cfg = parse_config(tiny_config_dict)
    train(cfg, toy_dataset(), tmp_path, max_steps=1, progress=False)
    tiny_config_dict["train"]["lr"] = 5e-4
    with pytest.raises(TrainingError, match="another model, diffusion, text or train setting"):
        train(parse_config(tiny_config_dict), toy_dataset(), tmp_path, progress=False)


def test_resume_is_keyed_on_what_changes_the_weights(tmp_path, tiny_config_dict):
    """Sampling, safety, evaluation, pipeline and bookkeeping settings resume the same training
    and give its card their sampling defaults; the data's content does not."""
    cfg = parse_config(tiny_config_dict)
    first = train(cfg, toy_dataset(), tmp_path, progress=False)
    changed = {
        **tiny_config_dict,
        "sample": {**tiny_config_dict["sample"], "guidance_scale": 3.5, "steps": 9},
        "safety": {"detectors": [{"name": "sanity"}]},
        "evaluation": {"interval_draws": 7},
        "pipeline": {"num_samples": 10, "shards": 3},
        "train": {**tiny_config_dict["train"], "log_every": 2, "checkpoint_every": 5},
    }
    again = train(parse_config(changed), toy_dataset(), tmp_path, progress=False)
    assert again.steps == 0 and again.checkpoint == first.checkpoint
    assert again.card.sampling.guidance_scale == 3.5 and again.card.sampling.steps == 9
    other = toy_dataset()
    other.images[0] ^= 1  # one pixel of one image differs: other data, another training
    with pytest.raises(TrainingError, match="other data"):
        train(cfg, other, tmp_path, progress=False)


def test_training_reduces_loss_and_checkpoint_loads(tmp_path, tiny_config_dict):
    tiny_config_dict["train"].update(steps=40, lr=3e-3, log_every=10, checkpoint_every=20)
    cfg = parse_config(tiny_config_dict)
    data = toy_dataset()
    result = train(cfg, data, tmp_path, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-0000020",
        "step-0000040",
    ]
    net, card = load_model(tmp_path / "checkpoints")
    assert card.num_classes == 3 and card.dataset_sha256 == data.sha256()
    request = SampleRequest(
        sampler="ddim", steps=4, guidance_scale=2.0, batch_size=4, num_samples=6
    )
    out = generate(net, card, request)
    assert out.images.shape == (6, 1, 8, 8) and out.images.dtype == torch.uint8
    assert out.labels.tolist() == [0, 1, 2, 0, 1, 2]
    # Samples do not depend on how they are batched.
    again = generate(net, card, request.model_copy(update={"batch_size": 6}))
    assert torch.equal(out.images, again.images)


def test_edm_lognormal_training_resumes_exactly_and_samples(tmp_path, tiny_config_dict):
    """EDM's target at log-normal (fractional) timesteps: exact resume, and the card's adapter
    samples it (Heun on Karras sigmas, guidance in an interval: 2 x 3 - 1 evaluations)."""
    tiny_config_dict["diffusion"].update(prediction="edm", timesteps="lognormal", sigma_data=0.6)
    tiny_config_dict["train"].update(steps=4, checkpoint_every=100)
    cfg = parse_config(tiny_config_dict)
    data = toy_dataset()
    straight = train(cfg, data, tmp_path / "a", progress=False)
    train(cfg, data, tmp_path / "b", max_steps=2, progress=False)
    resumed = train(cfg, data, tmp_path / "b", progress=False)
    a, b = (
        weights(straight.checkpoint, "ema.safetensors"),
        weights(resumed.checkpoint, "ema.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    net, card = load_model(straight.checkpoint)
    assert prediction_for(card.diffusion) == EDMPrediction(sigma_data=0.6)
    request = SampleRequest(
        sampler="heun",
        steps=3,
        spacing="karras",
        guidance_scale=2.0,
        guidance_interval=(0.2, 20.0),
        num_samples=3,
    )
    out = generate(net, card, request)
    assert out.images.shape == (3, 1, 8, 8) and out.nfe == 5


def test_nan_loss_is_an_error(tmp_path, tiny_config_dict, monkeypatch):
    cfg = parse_config(tiny_config_dict)

    def nan_loss(self, net, x0, cond, t, eps):
        return torch.full((x0.shape[0],), float("nan"), requires_grad=True)

    monkeypatch.setattr(training.DiffusionLoss, "__call__", nan_loss)
    with pytest.raises(TrainingError, match="loss is nan at step 0"):
        train(cfg, toy_dataset(), tmp_path, progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_interrupted_checkpoint_write_leaves_previous(tmp_path, tiny_config_dict, monkeypatch):
    cfg = parse_config(tiny_config_dict)
    first = train(cfg, toy_dataset(), tmp_path, max_steps=3, progress=False)

    def failing_save(tensors, path):
        if str(path).endswith("ema.safetensors"):
            raise OSError("disk full")
        torch.save(tensors, path)

    monkeypatch.setattr(model, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, toy_dataset(), tmp_path, progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints") == first.checkpoint
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-0000003"]


def test_write_checkpoint_keeps_last_two(tmp_path, tiny_config_dict):
    cfg = parse_config(tiny_config_dict)
    card = ModelCard(
        model=cfg.model,
        diffusion=cfg.diffusion,
        in_channels=1,
        image_size=8,
        class_names=("a",),
        num_classes=1,
        dataset_sha256="x",
    )
    w = {"w": torch.ones(2)}
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, card=card, weights=w, ema=w, state={"step": step})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000003"
    assert not list(tmp_path.glob(".tmp*"))


def test_batch_schedule_is_a_function_of_the_step():
    schedule = BatchSchedule(10, 4, seed=3)
    seq = [schedule.indices(s).tolist() for s in range(5)]
    again = BatchSchedule(10, 4, seed=3)
    assert [again.indices(s).tolist() for s in (4, 2, 3)] == [seq[4], seq[2], seq[3]]
    # Each epoch is a permutation cut into two full batches of 4 (the ragged end dropped) ...
    epoch0 = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003))
    assert seq[0] + seq[1] == epoch0[:8].tolist() and len(set(seq[0] + seq[1])) == 8
    # ... and the next epoch another permutation.
    epoch1 = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))
    assert seq[2] + seq[3] == epoch1[:8].tolist()


def test_ema_warmup_and_update():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(10**6) == 0.999
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.shadow["weight"].clone()
    ema.update(net, step=0)
    expected = before + (1 - 0.1) * (net.weight - before)
    assert torch.allclose(ema.shadow["weight"], expected)


def test_power_ema_is_its_closed_form_weighted_average():
    """After T updates the power-function EMA is sum_i (1 - beta_i) (i / T)^(gamma + 1) w_i with
    beta_i = (1 - 1/i)^(gamma + 1) (the weights sum to 1), and sigma_rel is the relative width
    of that profile: EDM2's pairs (0.05 -> gamma 16.97, 0.10 -> 6.94) and the profile's own
    standard deviation over a long run."""
    assert ema_module.gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert ema_module.gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.05, 0.15, 0.28):
        gamma = ema_module.gamma_of_sigma_rel(sigma_rel)
        assert ema_module.sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-9)
        t = torch.arange(1, 200_001, dtype=torch.float64)
        w = (1 - (1 - 1 / t) ** (gamma + 1)) * (t / t[-1]) ** (gamma + 1)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-9)
        mean = float((w * t).sum() / t[-1])
        std = math.sqrt(float((w * (t / t[-1] - mean) ** 2).sum()))
        assert std == pytest.approx(sigma_rel, rel=1e-3)
    for bad in (0.0, -0.1, ema_module.SIGMA_REL_MAX, 0.5):
        with pytest.raises(ValueError, match="sigma_rel"):
            ema_module.gamma_of_sigma_rel(bad)

    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.999, sigma_rel=0.1)
    gamma = ema_module.gamma_of_sigma_rel(0.1)
    values = torch.randn(40, 2, 3, generator=torch.Generator().manual_seed(0))
    for step, value in enumerate(values):
        with torch.no_grad():
            net.weight.copy_(value)
        ema.update(net, step)
    t = torch.arange(1, 41, dtype=torch.float64)
    w = (1 - (1 - 1 / t) ** (gamma + 1)) * (t / 40) ** (gamma + 1)
    expected = (w[:, None, None] * values.double()).sum(0)
    assert torch.allclose(ema.shadow["weight"].double(), expected, atol=1e-6)


def test_the_trainer_uses_the_power_ema_and_refuses_two_profiles(tmp_path, tiny_config_dict):
    """Its first update copies the network (beta_1 = 0), unlike the fixed decay's 0.1; it
    resumes exactly; a changed ema_decay beside it is refused, naming both keys, while a
    resolved config (every key at its value) parses again."""
    tiny_config_dict["train"].update(steps=1, checkpoint_every=100, ema_sigma_rel=0.05)
    cfg = parse_config(tiny_config_dict)
    one = train(cfg, toy_dataset(), tmp_path / "one", progress=False).checkpoint
    a, b = weights(one, "weights.safetensors"), weights(one, "ema.safetensors")
    assert all(torch.equal(a[k].float(), b[k]) for k in a)
    assert parse_config(cfg.to_dict()) == cfg

    cfg = parse_config({**tiny_config_dict, "train": {**tiny_config_dict["train"], "steps": 4}})
    straight = train(cfg, toy_dataset(), tmp_path / "a", progress=False).checkpoint
    train(cfg, toy_dataset(), tmp_path / "b", max_steps=2, progress=False)
    resumed = train(cfg, toy_dataset(), tmp_path / "b", progress=False).checkpoint
    a, b = weights(straight, "ema.safetensors"), weights(resumed, "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], weights(straight, "weights.safetensors")[k]) for k in a)

    tiny_config_dict["train"]["ema_decay"] = 0.99
    with pytest.raises(ValueError, match=r"train\.ema_sigma_rel=0\.05 replaces train\.ema_decay"):
        parse_config(tiny_config_dict)


@pytest.mark.parametrize("decay", ["none", "cosine", "linear"])
def test_learning_rate_follows_its_schedule_step_by_step(tmp_path, tiny_config_dict, decay):
    """Warm-up over 2 steps, then constant or falling to lr_final x lr at the last of 7 steps;
    the trainer's logged rate after step s is the rate of step s (closed forms)."""
    lr, final = 1e-3, 0.1 if decay != "none" else 0.0
    tiny_config_dict["train"].update(
        steps=7, warmup_steps=2, lr=lr, lr_decay=decay, lr_final=final, log_every=1
    )
    records: list[dict[str, float]] = []
    train(parse_config(tiny_config_dict), toy_dataset(), tmp_path, on_log=records.append)
    logged = {int(r["step"]): r["lr"] for r in records}
    progress = {s: (s - 2) / 4 for s in range(2, 7)}  # steps 2..6 decay, 6 being the last
    shape = {
        "none": lambda p: 1.0,
        "cosine": lambda p: final + (1 - final) * (1 + math.cos(math.pi * p)) / 2,
        "linear": lambda p: final + (1 - final) * (1 - p),
    }[decay]
    expected = {1: lr * 2 / 2, **{s: lr * shape(p) for s, p in progress.items()}}
    for s, want in expected.items():
        assert logged[s] == pytest.approx(want), f"step {s}"
    if decay != "none":
        assert logged[6] == pytest.approx(lr * final) and logged[4] < logged[3] < logged[2]


def test_lr_final_without_a_decay_is_refused(tiny_config_dict):
    tiny_config_dict["train"]["lr_final"] = 0.1
    with pytest.raises(
        ValueError, match=r"train\.lr_final=0\.1 takes effect only with train\.lr_decay"
    ):
        parse_config(tiny_config_dict)


def test_a_constant_learning_rate_keeps_the_training_identity_of_older_configs(tiny_config_dict):
    """lr_decay, lr_final and augment enter the identity only when set, so the checkpoints of
    configs written before these settings still resume; a decay is another training."""
    cfg = parse_config(tiny_config_dict)
    dumped = cfg.train.model_dump(mode="json", exclude={*config.TRAIN_BOOKKEEPING, "init_from"})
    del dumped["lr_decay"], dumped["lr_final"], dumped["augment"], dumped["ema_sigma_rel"]
    older = config._digest(
        {
            "model": cfg.model.model_dump(mode="json"),
            "diffusion": cfg.diffusion.model_dump(mode="json"),
            "text": None,
            "train": dumped,
            "dataset_sha256": "d",
        }
    )
    assert cfg.training_identity("d") == older
    tiny_config_dict["train"]["lr_decay"] = "cosine"
    assert parse_config(tiny_config_dict).training_identity("d") != older
    del tiny_config_dict["train"]["lr_decay"]
    tiny_config_dict["train"]["ema_sigma_rel"] = 0.05
    assert parse_config(tiny_config_dict).training_identity("d") != older


def test_a_compiled_network_trains_and_keeps_its_ema(tmp_path, tiny_config_dict, monkeypatch):
    """train.compile wraps the network in torch.compile, whose state-dict keys carry a prefix;
    the EMA and the checkpoint still follow the network itself: same weights and EMA as an eager
    run (torch.compile's eager backend here, so that the test does not wait for a C++ compile)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))
    tiny_config_dict["train"].update(steps=3, checkpoint_every=100, precision="fp32")
    data = toy_dataset()
    runs = {}
    for compiled in (False, True):
        tiny_config_dict["train"]["compile"] = compiled
        runs[compiled] = train(parse_config(tiny_config_dict), data, tmp_path / str(compiled))
    for name in ("weights.safetensors", "ema.safetensors"):
        a, b = weights(runs[False].checkpoint, name), weights(runs[True].checkpoint, name)
        assert a.keys() == b.keys() and not any(k.startswith("_orig_mod") for k in b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), f"{name}:{k} differs when compiled"
    ema = weights(runs[True].checkpoint, "ema.safetensors")
    init = weights(runs[True].checkpoint, "weights.safetensors")
    assert any(not torch.equal(ema[k], init[k]) for k in ema)  # the EMA did move


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tiny_config_file):
    """torchrun with 2 gloo processes trains to the same weights as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFPIPE_HOME": str(tmp_path)}
    common = ["--config", str(tiny_config_file), "--quiet", "--set", "train.precision=fp32"]
    single = [
        sys.executable,
        "-m",
        "diffpipe.flows.cli",
        "train",
        "--out",
        str(tmp_path / "one"),
        *common,
    ]
    subprocess.run(single, check=True, env=env, cwd=REPO, timeout=300)
    ddp = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "diffpipe.flows.cli",
        "train",
        "--out",
        str(tmp_path / "two"),
        *common,
    ]
    subprocess.run(ddp, check=True, env=env, cwd=REPO, timeout=300)
    one = weights(latest_checkpoint(tmp_path / "one" / "checkpoints"), "weights.safetensors")
    two = weights(latest_checkpoint(tmp_path / "two" / "checkpoints"), "weights.safetensors")
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k


def test_3d_training_on_a_cpu_keeps_channels_last_and_matches_contiguous(
    tmp_path, tiny_config_dict, monkeypatch
):
    """The 3-D U-Net trains channels-last on a CPU in fp32 (faster there): the same weights as
    a contiguous run up to float rounding, exact resume, and contiguous checkpoints."""
    tiny_config_dict["data"] = {"kind": "volumes", "image_size": 8}
    tiny_config_dict["model"].update(
        dims=3, base_channels=8, channel_mults=[1, 2], attention_resolutions=[4]
    )
    tiny_config_dict["train"].update(steps=4, checkpoint_every=100, precision="fp32")
    cfg = parse_config(tiny_config_dict)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 8, 8, 8), generator=g, dtype=torch.uint8)
    data = ImageDataset(images=images, labels=torch.arange(32) % 3, class_names=["a", "b", "c"])

    cpu = torch.device("cpu")
    # The networks of this config (3-D) and of the 2-D tiny config, as the trainer builds them.
    volume_net = card_for(cfg, num_classes=3).build()
    image_net = card_for(parse_config(TINY)).build()
    assert training.training_layout(volume_net, cpu, "fp32") == torch.channels_last_3d
    assert training.training_layout(volume_net, cpu, "bf16") == torch.contiguous_format
    assert training.training_layout(image_net, cpu, "fp32") == torch.contiguous_format

    chosen = []
    rule = training.training_layout
    monkeypatch.setattr(
        training, "training_layout", lambda *a: chosen.append(rule(*a)) or chosen[-1]
    )
    laid_out = train(cfg, data, tmp_path / "a", progress=False)
    assert chosen == [torch.channels_last_3d]
    train(cfg, data, tmp_path / "b", max_steps=2, progress=False)
    resumed = train(cfg, data, tmp_path / "b", progress=False)
    monkeypatch.setattr(training, "training_layout", lambda *a: torch.contiguous_format)
    plain = train(cfg, data, tmp_path / "c", progress=False)
    for name in ("weights.safetensors", "ema.safetensors"):
        a, b, c = (weights(r.checkpoint, name) for r in (laid_out, resumed, plain))
        for k in a:
            assert a[k].is_contiguous()
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
            torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k}")
