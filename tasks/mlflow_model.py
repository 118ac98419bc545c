"""The registered model: an MLflow pyfunc defined from code (no pickled classes).

Logged with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"weights": ...,
"card": ...})``; the weights are safetensors and the network is rebuilt from the model card
(versions registered before the card carry ``config.json``, read the same way). Requests are
``diffusion_core.sampling`` requests: this file only turns MLflow's input into one.

``mlflow.pyfunc.load_model("models:/<name>@challenger").predict({...})`` samples images:

    {"num_samples": 8, "labels": [3, 3, 7], "sampler": "ddim", "steps": 25,
     "guidance_scale": 1.5, "seed": 0}

Every key is optional (defaults: the model card's sampling, class-balanced labels; one label is
used for every sample). The result is a uint8 array (N, H, W, C), or (N, D, H, W, C) for a volume
model. An unknown key or a bad value is a ValueError naming it.

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


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values (what the request models validate)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "uifb":
        return value.tolist()
    return value


def _as_request(model_input: Any) -> dict[str, Any]:
    """A dict, a one-row DataFrame or a list holding one dict (None values left out)."""
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
    arrays = ("image", "mask")  # kept as arrays: read by ``sampling.inpaint_inputs``
    request = {k: v if k in arrays else _plain(v) for k, v in model_input.items() if v is not None}
    if isinstance(request.get("prompts"), str):
        request["prompts"] = [request["prompts"]]
    return request


class DiffusionModel(mlflow.pyfunc.PythonModel):
    """Samples images from a diffpipe checkpoint."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        """The network on the device of ``model_config={"device": ...}`` (default: auto, the
        GPU when there is one). ``model_config`` may also give ``sampling`` (default knobs in
        place of the card's: what ``diffpipe.tasks.tracking.load_registered`` passes from the
        version's ``diffpipe.sampling`` tag) and ``max_samples`` (the request limit)."""
        from diffusion_core.config import SamplingDefaults
        from diffusion_core.distributed import inference_dtype, resolve_device
        from diffusion_core.model import ModelCard, load_network
        from diffusion_core.settings import settings

        artifacts, options = context.artifacts, dict(context.model_config or {})
        self.card = ModelCard.read(
            artifacts["card"] if "card" in artifacts else artifacts["config"]
        )
        if options.get("sampling"):  # the version's default sampling (the sweep's choice)
            sampling = SamplingDefaults.model_validate(options["sampling"])
            self.card = self.card.with_sampling(sampling)
        self.max_samples = int(options.get("max_samples") or settings().max_samples)
        self.device = resolve_device(options.get("device", "auto"))
        self.dtype = inference_dtype(self.device, options.get("precision", "auto"))
        self.net = load_network(self.card, artifacts["weights"]).to(self.device)

    # No type hints here: MLflow would read them as an input schema for lists of records.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from diffusion_core.sampling import SampleRequest, check_size, generate

        request = _as_request(model_input) | dict(params or {})
        if {"image", "mask"} & set(request):
            return self._inpaint(request)
        parsed = SampleRequest.model_validate(request)
        check_size(parsed, self.max_samples)
        samples = generate(self.net, self.card, parsed, dtype=self.dtype)
        return samples.images.movedim(1, -1).numpy()  # (N, H, W, C) or (N, D, H, W, C)

    def _inpaint(self, request: dict[str, Any]) -> np.ndarray:
        """Complete ``request["image"]`` where ``request["mask"]`` is black; (N, H, W, C)."""
        from diffusion_core.sampling import InpaintRequest, check_size, inpaint, inpaint_inputs

        if "image" not in request or "mask" not in request:
            raise ValueError("an inpainting request needs both 'image' and 'mask'")
        image, mask = request.pop("image"), request.pop("mask")
        parsed = InpaintRequest.model_validate(request)
        check_size(parsed, self.max_samples)  # before the images are read
        known, mask = inpaint_inputs(image, mask, self.card)
        check_size(parsed.model_copy(update={"num_samples": len(known)}), self.max_samples)
        n = parsed.num_samples or len(known)
        if n != len(known):
            if len(known) != 1:
                raise ValueError(f"num_samples {n} with {len(known)} images; give one image")
            known = known.repeat(n, 1, 1, 1)
        filled = inpaint(self.net, self.card, parsed, known, mask, dtype=self.dtype)
        return filled.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)


mlflow.models.set_model(DiffusionModel())
