"""The registered model: an MLflow pyfunc defined from code (no pickled classes).

Logged with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"weights": ...,
"config": ...})``; the weights are safetensors and the network is rebuilt from ``config.json``.

``mlflow.pyfunc.load_model("models:/<name>@challenger").predict({...})`` samples images:

    {"num_samples": 8, "labels": [3, 3, 7], "sampler": "ddim", "steps": 25,
     "guidance_scale": 1.5, "seed": 0}

Every key is optional (defaults: the model's own sampling config, class-balanced labels). The
result is a uint8 array (N, H, W, C), or (N, D, H, W, C) for a volume model.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

PREDICT_KEYS = {"num_samples", "labels", "sampler", "steps", "guidance_scale", "seed", "eta"}


def _as_request(model_input: Any) -> dict[str, Any]:
    """A dict, a one-row DataFrame or a list holding one dict."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "iloc"):  # pandas DataFrame
        records = model_input.to_dict(orient="records")
        model_input = records[0] if records else {}
    if isinstance(model_input, list) and len(model_input) == 1:
        model_input = model_input[0]
    if not isinstance(model_input, dict):
        raise ValueError(
            f"predict expects a dict of sampling options, got {type(model_input).__name__}"
        )
    unknown = set(model_input) - PREDICT_KEYS
    if unknown:
        raise ValueError(f"unknown predict keys {sorted(unknown)}; allowed: {sorted(PREDICT_KEYS)}")
    return {k: v for k, v in model_input.items() if v is not None}


class DiffusionModel(mlflow.pyfunc.PythonModel):
    """Samples images from a diffpipe checkpoint."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        from diffusion_core.training import load_model_files

        self.net, self.spec = load_model_files(
            context.artifacts["config"], context.artifacts["weights"]
        )

    # No type hints here: MLflow would read them as an input schema for lists of records.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from diffusion_core.sampling import generate

        request = _as_request(model_input) | dict(params or {})
        labels = request.pop("labels", None)
        labels_t = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        n = int(request.pop("num_samples", len(labels) if labels is not None else 8))
        sc = self.spec.config.sample.model_copy(update=request)
        sc = type(sc).model_validate(sc.model_dump())  # validate the requested values
        samples = generate(self.net, self.spec, sc, num_samples=n, labels=labels_t)
        return samples.images.movedim(1, -1).numpy()  # (N, H, W, C) or (N, D, H, W, C)


mlflow.models.set_model(DiffusionModel())
