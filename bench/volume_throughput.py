"""Training and sampling throughput of the volume config in channels-last (NDHWC) memory against
the contiguous (NCDHW) layout, on this machine.

Training: ``diffusion_core.training.train`` on ``configs/volume3d.yaml`` for ``--steps`` steps,
once as the trainer lays the network out (``training.training_layout``: channels-last for our 3-D
U-Net on a CPU in fp32) and once forced contiguous, alternating for ``--rounds`` rounds; the
trainer's own volumes per second (after its first steps) are compared. Sampling: one guided
network call on a batch as the sample step makes it (``sample.batch_size`` conditional and as
many unconditional volumes), ``sampling.sampling_network``'s copy against the network as it is.
The ratio is channels-last over contiguous; the two layouts compute the same function (the
largest difference of the sampling outputs is printed).

    python bench/volume_throughput.py [--steps 80] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusion_core import training
from diffusion_core.config import load_config
from diffusion_core.data import load_dataset, split_dataset
from diffusion_core.parameterization import Cond
from diffusion_core.sampling import sampling_network
from diffusion_core.training import model_card

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "volume3d.yaml"))
    p.add_argument("--steps", type=int, default=80, help="training steps per timed run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    cfg = load_config(args.config, {"train.steps": args.steps, "train.checkpoint_every": 10**6})
    train_set, _ = split_dataset(
        load_dataset(cfg.data), holdout_fraction=cfg.data.holdout_fraction, seed=cfg.data.split_seed
    )
    print(f"host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")

    # Training: the trainer's choice against a forced contiguous layout, alternating.
    rule = training.training_layout
    train_rate: dict[str, list[float]] = {"channels-last": [], "contiguous": []}
    for _ in range(args.rounds):
        for name in train_rate:
            if name == "contiguous":
                training.training_layout = lambda *a: torch.contiguous_format  # type: ignore[assignment]
            with tempfile.TemporaryDirectory() as out:
                result = training.train(cfg, train_set, out, progress=False)
            training.training_layout = rule  # type: ignore[assignment]
            train_rate[name].append(result.images_per_second)
            print(f"train {name:<14} {result.images_per_second:6.1f} volumes/s", flush=True)

    # Sampling: one guided call on the sample step's batch, both layouts of the same weights.
    card = model_card(cfg, train_set, None)
    torch.manual_seed(0)
    net = card.build().eval()
    net.conv_out.reset_parameters()  # zero-initialised for training: the outputs would be 0
    fast = sampling_network(net, None)
    b = cfg.sample.batch_size
    x = torch.randn(2 * b, *card.sample_shape)
    t = torch.full((2 * b,), cfg.diffusion.num_steps // 2)
    k = card.num_classes  # guided: the conditional half, then the null class k
    assert k is not None, "the sampling call is timed for a class-conditional config"
    labels = torch.cat([torch.arange(b) % k, torch.full((b,), k)])
    cond = Cond(labels=labels)
    sample_s: dict[str, list[float]] = {"channels-last": [], "contiguous": []}
    with torch.no_grad():
        diff = float((net(x, t, cond) - fast(x, t, cond)).abs().max())
        for _ in range(3):
            for name, n in (("channels-last", fast), ("contiguous", net)):
                t0 = time.perf_counter()
                n(x, t, cond)
                sample_s[name].append(time.perf_counter() - t0)
    out = {
        "train_volumes_per_second": {k: statistics.median(v) for k, v in train_rate.items()},
        "sample_call_seconds": {k: statistics.median(v) for k, v in sample_s.items()},
        "sample_max_abs_diff": diff,
    }
    tr, sc = out["train_volumes_per_second"], out["sample_call_seconds"]
    out["train_ratio"] = tr["channels-last"] / tr["contiguous"]
    out["sample_ratio"] = sc["contiguous"] / sc["channels-last"]
    print(
        f"training: {tr['channels-last']:.1f} against {tr['contiguous']:.1f} volumes/s = "
        f"{out['train_ratio']:.2f}x; sampling call on {2 * b} volumes: "
        f"{sc['channels-last'] * 1e3:.0f} against {sc['contiguous'] * 1e3:.0f} ms = "
        f"{out['sample_ratio']:.2f}x (largest difference {diff:.1e})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
