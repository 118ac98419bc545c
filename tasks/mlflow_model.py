"""The registered model: an MLflow pyfunc defined from code (no pickled classes).

Logged with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"weights": ...,
"config": ...})``; the weights are safetensors and the network is rebuilt from ``config.json``.

``mlflow.pyfunc.load_model("models:/<name>@challenger").predict({...})`` samples images:

    {"num_samples": 8, "labels": [3, 3, 7], "sampler": "ddim", "steps": 25,
     "guidance_scale": 1.5, "seed": 0}

Every key is optional (defaults: the model's own sampling config, class-balanced labels). The
result is a uint8 array (N, H, W, C), or (N, D, H, W, C) for a volume model.

An inpainting request carries an ``image`` and a ``mask`` (white or True = keep) and fills the
rest with RePaint; the known region of the result equals ``image`` exactly:

    {"image": uint8 (H, W), (H, W, C) or (N, H, W, C), "mask": (H, W) or (N, H, W),
     "jump_length": 10, "resample": 10, "steps": 25, "seed": 0, "labels": [...],
     "num_samples": k}

``num_samples`` asks for k completions of a single image; ``resample`` 1 is plain replacement.

Text-conditioned models take prompts instead of labels, cycled over the samples (default: one
sample per prompt): ``{"prompts": ["a red square at the top left"], "num_samples": 4}``, or a
DataFrame with a ``prompt`` column (one prompt a row; other columns from its first row).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

PREDICT_KEYS = {
    "num_samples",
    "labels",
    "prompts",
    "sampler",
    "steps",
    "guidance_scale",
    "seed",
    "eta",
}
INPAINT_KEYS = {"image", "mask", "jump_length", "resample"}
NOT_FOR_INPAINTING = {"sampler", "eta"}  # RePaint takes DDPM steps on the configured grid


def _as_request(model_input: Any) -> dict[str, Any]:
    """A dict, a one-row DataFrame or a list holding one dict."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "iloc"):  # pandas DataFrame
        records = model_input.to_dict(orient="records")
        model_input = dict(records[0]) if records else {}
        if "prompt" in model_input:  # one prompt a row
            model_input["prompts"] = [str(r["prompt"]) for r in records]
            del model_input["prompt"]
    if isinstance(model_input, list) and len(model_input) == 1:
        model_input = model_input[0]
    if not isinstance(model_input, dict):
        raise ValueError(
            f"predict expects a dict of sampling options, got {type(model_input).__name__}"
        )
    unknown = set(model_input) - PREDICT_KEYS - INPAINT_KEYS
    if unknown:
        allowed = sorted(PREDICT_KEYS | INPAINT_KEYS)
        raise ValueError(f"unknown predict keys {sorted(unknown)}; allowed: {allowed}")
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
        if INPAINT_KEYS & set(request):
            return self._inpaint(request)
        labels = request.pop("labels", None)
        labels_t = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        prompts = request.pop("prompts", None)
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is not None:
            prompts = list(prompts)
        given = labels if labels is not None else prompts
        n = int(request.pop("num_samples", len(given) if given is not None else 8))
        sc = self.spec.config.sample.model_copy(update=request)
        sc = type(sc).model_validate(sc.model_dump())  # validate the requested values
        samples = generate(self.net, self.spec, sc, num_samples=n, labels=labels_t, prompts=prompts)
        return samples.images.movedim(1, -1).numpy()  # (N, H, W, C) or (N, D, H, W, C)

    def _inpaint(self, request: dict[str, Any]) -> np.ndarray:
        """Complete ``request["image"]`` where ``request["mask"]`` is black; (N, H, W, C)."""
        from diffusion_core.inpainting import arrays_to_batch
        from diffusion_core.sampling import inpaint_images

        if "image" not in request or "mask" not in request:
            raise ValueError("an inpainting request needs both 'image' and 'mask'")
        if NOT_FOR_INPAINTING & set(request):
            raise ValueError(
                f"{sorted(NOT_FOR_INPAINTING & set(request))} do not apply to inpainting "
                "(RePaint takes DDPM steps); leave them out"
            )
        known, mask = arrays_to_batch(
            request.pop("image"),
            request.pop("mask"),
            size=self.spec.image_size,
            channels=self.spec.in_channels,
        )
        n = int(request.pop("num_samples", len(known)))
        if n < 1:
            raise ValueError(f"num_samples must be at least 1, got {n}")
        if n != len(known):
            if len(known) != 1:
                raise ValueError(f"num_samples {n} with {len(known)} images; give one image")
            known = known.repeat(n, 1, 1, 1)
        labels = request.pop("labels", None)
        labels_t = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if labels_t is not None and len(labels_t) == 1:
            labels_t = labels_t.repeat(len(known))
        if labels_t is not None and len(labels_t) != len(known):
            raise ValueError(
                f"{len(labels_t)} labels for {len(known)} images; give one or one each"
            )
        jump_length = int(request.pop("jump_length", 10))
        resample = int(request.pop("resample", 10))
        sc = self.spec.config.sample.model_copy(update=request)
        sc = type(sc).model_validate(sc.model_dump())
        filled = inpaint_images(
            self.net, self.spec, sc, known, mask,
            labels=labels_t, jump_length=jump_length, resample=resample,
        )  # fmt: skip
        return filled.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)


mlflow.models.set_model(DiffusionModel())
