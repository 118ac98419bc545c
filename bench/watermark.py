"""The small-image watermark measured: bit accuracy, payload recovery, false positives, PSNR and
throughput on the quickstart's digits and on 32x32 colour images.

Sets: ``digits16`` (the 1,797 scikit-learn digits at 16x16, greyscale: the quickstart's
images), ``shapes32`` (1,000 synthetic colour shapes at 32x32), ``noise32`` (1,000 uniform
random RGB images at 32x32). Each set is marked with one payload under one key, then read
back after a PNG round trip and after JPEG at quality 90 and 75 (Pillow, 4:2:0 chroma), read
as the verifier reads files (a colour JPEG's Y plane); colour sets also after JPEG 90 read as
RGB pixels (``jpeg90_rgb``).
False positives: the unmarked images of every set plus blank, saturated and constant ones
read with the key, and the marked ones read with another key. Throughput is images per second
of one process (``OMP_NUM_THREADS=1``), batches of 256.

    python bench/watermark.py [--strength 18] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion_core import watermark as wm  # noqa: E402
from diffusion_core.config import DataConfig  # noqa: E402
from diffusion_core.data import load_dataset  # noqa: E402
from diffusion_core.io import psnr as image_psnr  # noqa: E402

KEY = wm.WatermarkKey(b"bench-key-0123456789abcdef", source="bench")
OTHER_KEY = wm.WatermarkKey(b"bench-other-key-0123456789", source="bench")
PAYLOAD = wm.Payload.for_model("quickstart", 7)


def image_sets() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "digits16": load_dataset(DataConfig(kind="digits", image_size=16)).images,
        "shapes32": load_dataset(DataConfig(kind="shapes", image_size=32, num_samples=1000)).images,
        "noise32": torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=gen),
    }


def timed(fn, images: torch.Tensor, batch: int = 256) -> tuple[list, float, float]:
    """fn over ``images`` in batches; the outputs, images per wall second and images per CPU
    second of this process (less sensitive to other processes taking turns on the cores)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = [fn(images[i : i + batch]) for i in range(0, len(images), batch)]
    return out, len(images) / (time.perf_counter() - t0), len(images) / (time.process_time() - c0)


def jpeg_as_rgb(images: torch.Tensor, quality: int) -> torch.Tensor:
    """A JPEG round trip read back as RGB pixels (chroma upsampled, clipped) rather than as the
    Y plane the verifier reads: what a mark faces after a JPEG was converted to another format."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as img:
            out.append(torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out)


def measure(images: torch.Tensor, strength: float) -> dict[str, float]:
    wm.carrier(KEY, images.shape[2], images.shape[3], strength=strength)  # not timed: cached
    mark = lambda x: wm.embed(x, PAYLOAD, KEY, strength=strength)  # noqa: E731
    parts, embed_rate, embed_cpu = timed(mark, images)
    marked = torch.cat(parts)
    _, decode_rate, decode_cpu = timed(lambda x: wm.decode(x, KEY, strength=strength), marked)
    psnr = np.array([image_psnr(a, b) for a, b in zip(images, marked, strict=True)])
    row: dict[str, float] = {
        "images": len(images),
        "psnr_mean": float(psnr.mean()),
        "psnr_p5": float(np.percentile(psnr, 5)),
        "psnr_min": float(psnr.min()),
        "psnr_ge_38": float((psnr >= 38.0).mean()),
        "embed_per_s": embed_rate,
        "embed_per_cpu_s": embed_cpu,
        "decode_per_s": decode_rate,
        "decode_per_cpu_s": decode_cpu,
    }
    c = wm.carrier(KEY, images.shape[2], images.shape[3], strength=strength)
    s_marked = wm._correlations(marked.numpy().astype(np.float64), c)
    # The spread of an unmarked image's correlation: what additive spread spectrum would face.
    row["host_correlation_std"] = float(wm._correlations(images.numpy().astype(float), c).std())
    channels = {
        name: wm.round_trip(marked, jpeg_quality=quality)
        for name, quality in (("png", None), ("jpeg90", 90), ("jpeg75", 75))
    }
    if images.shape[1] == 3:
        channels["jpeg90_rgb"] = jpeg_as_rgb(marked, 90)
    for name, channel in channels.items():
        bits, _ = wm.read_bits(channel, KEY, strength=strength)
        readings = wm.decode(channel, KEY, strength=strength)
        shift = wm._correlations(channel.numpy().astype(np.float64), c) - s_marked
        row[f"{name}_bit_accuracy"] = float((bits == PAYLOAD.to_bits()).mean())
        row[f"{name}_payload_recovered"] = float(np.mean([r.payload == PAYLOAD for r in readings]))
        row[f"{name}_wrong_payload"] = float(
            np.mean([r.payload is not None and r.payload != PAYLOAD for r in readings])
        )
        row[f"{name}_correlation_shift_rms"] = float(np.sqrt((shift**2).mean()))
    row["wrong_key_false_positives"] = float(sum(r.marked for r in wm.decode(marked, OTHER_KEY)))
    return row


def false_positives(sets: dict[str, torch.Tensor], strength: float) -> dict[str, float]:
    """Unmarked images read with the key: how many pass the CRC."""
    extra = {
        "blank16": torch.zeros(1, 1, 16, 16, dtype=torch.uint8),
        "saturated32": torch.full((1, 3, 32, 32), 255, dtype=torch.uint8),
        "constant16": torch.full((1, 1, 16, 16), 128, dtype=torch.uint8),
    }
    total = marked = 0
    for images in [*sets.values(), *extra.values()]:
        readings = wm.decode(images, KEY, strength=strength)
        total += len(readings)
        marked += sum(r.marked for r in readings)
    return {"unmarked_images": total, "read_as_marked": marked, "rate": marked / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--strength", type=float, default=wm.DEFAULT_STRENGTH, help="lattice step at 16x16"
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = image_sets()
    measured = {name: measure(images, args.strength) for name, images in sets.items()}
    results = {"strength": args.strength, "sets": measured}
    results["false_positives"] = false_positives(sets, args.strength)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
