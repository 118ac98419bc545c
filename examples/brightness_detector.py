"""An example safety plug-in: flags images whose mean brightness exceeds a threshold.

Install it as a detector by declaring an entry point in the ``diffpipe.detectors`` group of your
package's metadata (``pyproject.toml``)::

    [project.entry-points."diffpipe.detectors"]
    brightness = "brightness_detector:BrightnessDetector"

and name it in the run config::

    safety:
      detectors:
        - name: brightness
          params: {max_mean: 200.0}

The entry point is a factory called with ``params`` as keyword arguments; what it returns is
called with each batch, ``(images, context) -> DetectorResult``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_core.safety.detector import DetectorResult, SafetyContext


class BrightnessDetector:
    """Mean grey level of each image (0..255); flagged when above ``max_mean``."""

    name = "brightness"

    def __init__(self, *, max_mean: float = 200.0) -> None:
        if not 0.0 <= max_mean <= 255.0:
            raise ValueError(f"brightness: max_mean must be in [0, 255], got {max_mean}")
        self.max_mean = float(max_mean)

    def __call__(self, images: Tensor, context: SafetyContext) -> DetectorResult:
        means = images.to(torch.float32).flatten(1).mean(dim=1)  # (N,) for uint8 (N, C, H, W)
        flagged = means > self.max_mean
        reasons = [
            f"mean brightness {m:.1f} > {self.max_mean:g}" if f else None
            for m, f in zip(means.tolist(), flagged.tolist(), strict=True)
        ]
        return DetectorResult(means, flagged, reasons, threshold=self.max_mean)
