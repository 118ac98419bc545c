"""What a registered model carries so that it installs and runs without this repository: the
``diffusion_core`` source as MLflow code paths (the sampling code travels with the weights), pip
requirements that name only public packages at the versions in use (never ``diffpipe``, which is
not on the public index: an unclaimed name there invites a dependency-confusion package), a
signature for the request's keys, and an input example."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, Schema

import diffusion_core
from diffusion_core.model import ModelCard

# The distributions the sampling path imports (``diffusion_core.sampling`` and what it pulls in).
RUNTIME_DISTRIBUTIONS = (
    "torch",
    "numpy",
    "safetensors",
    "pydantic",
    "pydantic-settings",
    "PyYAML",
    "pillow",
    "fsspec",
    "tqdm",
)
TEXT_DISTRIBUTIONS = ("open_clip_torch",)  # a text-conditioned model encodes its prompts

# Every key a request may hold (``tasks/mlflow_model.py``). Numbers that may be written as
# integers or floats, lists and arrays are ``Any``: the request model checks them and names the
# key when one is wrong.
REQUEST_SCHEMA = Schema(
    [
        ColSpec("long", "num_samples", required=False),
        ColSpec("string", "sampler", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("string", "spacing", required=False),
        ColSpec(AnyType(), "guidance_scale", required=False),
        ColSpec(AnyType(), "eta", required=False),
        ColSpec("string", "variance", required=False),
        ColSpec("boolean", "clip_x0", required=False),
        ColSpec(Array("long"), "labels", required=False),
        ColSpec(AnyType(), "prompts", required=False),
        ColSpec("string", "prompt", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "batch_size", required=False),
        ColSpec(AnyType(), "image", required=False),
        ColSpec(AnyType(), "mask", required=False),
        ColSpec("long", "jump_length", required=False),
        ColSpec("long", "resample", required=False),
    ]
)


def pip_requirements(card: ModelCard) -> list[str]:
    """The public distributions the model needs, pinned to the versions installed here."""
    names = RUNTIME_DISTRIBUTIONS + (TEXT_DISTRIBUTIONS if card.text is not None else ())
    return [f"{name}=={metadata.version(name)}" for name in names]


def code_paths() -> list[str]:
    """The ``diffusion_core`` package, copied into the model's ``code/`` folder."""
    return [str(Path(diffusion_core.__file__).parent)]


def input_example(card: ModelCard) -> dict[str, Any]:
    """A small request the model answers quickly: two samples in four steps."""
    example: dict[str, Any] = {"num_samples": 2, "steps": 4, "seed": 0}
    if card.num_classes:
        example["labels"] = [0, min(1, card.num_classes - 1)]
    return example


# The options ``load_context`` reads from ``model_config``, with their defaults. MLflow passes a
# load-time ``model_config`` key to the model only when the logged model declares that key, so
# every one is declared here (null: the model's own default).
MODEL_CONFIG: dict[str, Any] = {
    "device": "auto",
    "precision": "auto",
    "sampling": None,
    "max_samples": None,
}


def signature() -> ModelSignature:
    return ModelSignature(inputs=REQUEST_SCHEMA)
