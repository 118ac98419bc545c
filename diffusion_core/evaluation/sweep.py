"""Quality against sampling cost: one model sampled with several samplers and step counts, each
setting judged by FID (with its interval) beside its network evaluations and wall time.

NFE counts the calls of the network's forward per sample, measured with a forward hook. With
classifier-free guidance the conditional and unconditional halves run as one forward on a 2B
batch, which counts once: NFE is then the number of sampler steps, or 2 x steps - 1 for Heun.
Every setting starts from the same per-sample seeds (common random numbers), so
differences between settings are not noise draws. The sweep judges raw samples: it runs no safety
filter (its images are measured, never published).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_core.config import SweepSetting
from diffusion_core.evaluation.fidelity import paired_fid_gap
from diffusion_core.model import ModelCard
from diffusion_core.sampling import SampleRequest, generate

Scorer = Callable[[Tensor], dict[str, float]]  # uint8 images -> fid, fid_low, fid_high, ...


@contextlib.contextmanager
def count_forwards(net: nn.Module) -> Iterator[list[int]]:
    """Count calls of ``net.forward`` inside the block (the list's one element)."""
    calls = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        calls[0] += 1

    handle = net.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def sweep_row(
    net: nn.Module,
    card: ModelCard,
    request: SampleRequest,
    *,
    score: Scorer,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Sample with ``request``, time it, count NFE and score the images."""
    num_samples = request.count()
    with count_forwards(net) as calls:
        t0 = time.perf_counter()
        samples = generate(net, card, request, dtype=dtype)
        seconds = time.perf_counter() - t0
    batches = math.ceil(num_samples / request.batch_size)
    scores = score(samples.images)
    return {
        "sampler": samples.knobs.sampler,
        "steps": samples.knobs.steps,
        "spacing": samples.knobs.spacing,
        "nfe": calls[0] / batches,
        "wall_seconds": seconds,
        "fid": scores["fid"],
        "fid_low": scores["fid_low"],
        "fid_high": scores["fid_high"],
        "kid": scores["kid"],
        "precision": scores["precision"],
        "recall": scores["recall"],
        "guidance_scale": samples.knobs.guidance_scale,
        "num_samples": num_samples,
        "seed": request.seed,
    }


def run_sweep(
    net: nn.Module,
    card: ModelCard,
    base: SampleRequest,
    settings: tuple[SweepSetting, ...],
    *,
    score: Scorer,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """One row per setting; every other sampling knob (guidance, seed, count, and the spacing
    unless the setting names one) from ``base`` and the card."""
    return [
        sweep_row(
            net,
            card,
            base.model_copy(update=s.model_dump(exclude_none=True)),
            score=score,
            dtype=dtype,
        )
        for s in settings
    ]


def reference_index(rows: list[dict[str, Any]]) -> int:
    """Index of the reference setting: the DDPM row with the most steps, else the most NFE."""
    if not rows:
        raise ValueError("an empty sweep has no reference setting")
    ddpm = [i for i, r in enumerate(rows) if r["sampler"] == "ddpm"] or range(len(rows))
    return max(ddpm, key=lambda i: (rows[i]["steps"], rows[i]["nfe"]))


def cheapest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The setting with the fewest NFE (then the least wall time) among ``rows``; None if empty."""
    return min(rows, key=lambda r: (r["nfe"], r["wall_seconds"])) if rows else None


def paired_matches(
    rows: list[dict[str, Any]],
    features: list[Tensor],
    reference: Tensor,
    *,
    draws: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The sharper verdict of which settings match the reference setting (``reference_index``).

    ``features[i]`` are the FID features of row i's samples (every row from the same seeds);
    ``reference`` the reference images' features. Each row gets ``gap`` = FID(row) - FID(the
    reference setting) against ``reference``, with a paired half-sample interval
    (``fidelity.paired_fid_gap``: each draw takes the same seeds' rows of both sets and the same
    reference half, so the noise both share cancels), and ``matches``: the interval reaches 0
    (not worse at ``level``). Returns the rows, the reference row, the cheapest matching setting
    (``match``, fewest NFE then wall time), the fewest matching NFE per sampler and spacing
    (``first_match_nfe``), and a one-line note."""
    if len(rows) != len(features):
        raise ValueError(f"{len(rows)} sweep rows but {len(features)} feature sets")
    ref_i = reference_index(rows)
    out = []
    for i, (row, feats) in enumerate(zip(rows, features, strict=True)):
        if i == ref_i:
            gap, low, high = 0.0, 0.0, 0.0
        else:
            gap, low, high = paired_fid_gap(
                feats, features[ref_i], reference, draws=draws, level=level, seed=seed
            )
        out.append(row | {"gap": gap, "gap_low": low, "gap_high": high, "matches": low <= 0.0})
    ref = out[ref_i]
    matching = [r for i, r in enumerate(out) if i != ref_i and r["matches"]]
    first: dict[str, float] = {}
    for r in sorted(matching, key=lambda r: r["nfe"]):
        first.setdefault(f"{r['sampler']}:{r['spacing']}", r["nfe"])
    match = cheapest(matching)
    ref_name = f"{ref['sampler']}-{ref['steps']}"
    if match is None:
        note = f"No setting matches {ref_name} (every paired FID gap's interval is above 0)."
    else:
        note = (
            f"{match['sampler']}-{match['steps']} ({match['spacing']}) matches {ref_name} with "
            f"{match['nfe']:g} NFE: paired FID gap {match['gap']:+.3g} "
            f"[{match['gap_low']:+.3g}, {match['gap_high']:+.3g}] reaches 0 ({ref_name} takes "
            f"{ref['nfe']:g} NFE)."
        )
    return {"rows": out, "reference": ref, "match": match, "first_match_nfe": first, "note": note}


def fewest_nfe_match(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cheapest setting that reaches the reference quality: FID at or below the upper end of
    the reference's interval. The reference is the DDPM setting with the most steps (DDPM-1000 in
    the usual sweep), or the setting with the most NFE when no DDPM row exists."""
    reference = rows[reference_index(rows)]
    others = [r for r in rows if r is not reference and r["fid"] <= reference["fid_high"]]
    match = cheapest(others)
    ref_name = f"{reference['sampler']}-{reference['steps']}"
    if match is None:
        note = f"No setting reaches {ref_name} quality (FID <= {reference['fid_high']:.4g})."
    else:
        note = (
            f"{match['sampler']}-{match['steps']} reaches {ref_name} quality with "
            f"{match['nfe']:g} NFE (FID {match['fid']:.4g} <= {reference['fid_high']:.4g}, the "
            f"upper end of {ref_name}'s interval; {ref_name} takes {reference['nfe']:g} NFE)."
        )
    return {"reference": reference, "match": match, "note": note}
