"""Champion / challenger: when a new model may replace the current best one, and the metric
record that says what an evaluation may be compared with.

The promotion rule (:func:`decide`), in order:

1. **No champion yet**: the challenger is promoted. A champion that was never evaluated cannot
   be compared with: nothing is promoted over it until it is evaluated.
2. **Matching records**: two evaluations are comparable only when their metric records agree on
   every key of :data:`RECORD_KEYS` (feature extractor and the sha256 of its weights, reference
   set, number of samples, sampler, steps, guidance scale); a key missing on either side counts
   as a difference. Otherwise nothing is promoted and the reason names the differing keys: an FID
   measured with other features, another reference set or another sampler is another number.
3. **Better beyond the interval**: the challenger is promoted only when its whole FID interval
   lies below the champion's (``challenger fid_high < champion fid_low``). Overlapping intervals
   are a tie and the champion stays, even when the challenger's point estimate is lower: a
   difference inside the sampling noise of the metric is not evidence of a better model.

Evaluations are ``{"metrics": {...}, "record": {...}}`` as written by the evaluation stage; the
metrics must hold ``fid``, ``fid_low`` and ``fid_high``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RECORD_KEYS = (
    "engine",
    "extractor",
    "extractor_sha256",
    "reference_sha256",
    "reference_split",
    "num_samples",
    "num_reference",
    "sampler",
    "steps",
    "nfe",
    "spacing",
    "eta",
    "guidance_scale",
    "guidance_interval",
)
# Keys added to the record after records were first written, with the value every older record
# implicitly had: a record without the key matches one that holds this value.
RECORD_DEFAULTS: dict[str, Any] = {"guidance_interval": None}
FID_KEYS = ("fid", "fid_low", "fid_high")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def record_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The record keys on which two evaluations differ (missing keys count as differing, except
    those of ``RECORD_DEFAULTS``, which read as their default)."""
    a, b = RECORD_DEFAULTS | a, RECORD_DEFAULTS | b
    return [k for k in RECORD_KEYS if k not in a or k not in b or str(a[k]) != str(b[k])]


@dataclass(frozen=True)
class Champion:
    """The current champion: its version and its evaluation (None when never evaluated)."""

    version: str
    evaluation: dict[str, Any] | None


def decide(challenger: dict[str, Any], champion: Champion | None) -> Decision:
    """Promote when there is no champion, or when the challenger's FID interval is entirely below
    the champion's on a matching record; otherwise keep the champion and say why."""
    if champion is None:
        return Decision(True, "no champion yet")
    if champion.evaluation is None:
        return Decision(
            False, f"not comparable: the champion (version {champion.version}) was never evaluated"
        )
    return _decide(challenger, champion.evaluation)


def _decide(challenger: dict[str, Any], champion: dict[str, Any]) -> Decision:
    differ = record_mismatch(challenger.get("record", {}), champion.get("record", {}))
    if differ:
        values = "; ".join(
            f"{k}: {challenger.get('record', {}).get(k)!r} vs {champion.get('record', {}).get(k)!r}"
            for k in differ
        )
        return Decision(False, f"not comparable: metric records differ in {values}")
    c, k = challenger.get("metrics", {}), champion.get("metrics", {})
    missing = [
        f"{who} {key}"
        for who, m in (("challenger", c), ("champion", k))
        for key in FID_KEYS
        if key not in m
    ]
    if missing:
        return Decision(False, f"not comparable: no {', '.join(missing)}")
    if c["fid_high"] < k["fid_low"]:
        return Decision(True, f"FID {c['fid']:.3f} beats {k['fid']:.3f} beyond both intervals")
    if c["fid"] < k["fid"]:
        return Decision(False, f"FID {c['fid']:.3f} vs {k['fid']:.3f}: within the intervals, a tie")
    return Decision(False, f"FID {c['fid']:.3f} is not better than {k['fid']:.3f}")


def reference_record(
    *,
    engine: str,
    extractor: str,
    extractor_sha256: str,
    reference_sha256: str,
    num_reference: int,
) -> dict[str, Any]:
    """What a metric was measured with and against: the metric record's reference part."""
    return {
        "engine": engine,
        "extractor": extractor,
        "extractor_sha256": extractor_sha256,
        "reference_sha256": reference_sha256,
        "reference_split": "holdout",
        "num_reference": num_reference,
    }


def sampling_record(knobs: Mapping[str, Any], *, nfe: int, seed: int) -> dict[str, Any]:
    """How the judged samples were drawn: the metric record's sampling part."""
    return {
        "sampler": knobs["sampler"],
        "steps": knobs["steps"],
        "nfe": nfe,  # one network call per step; guided halves are one 2B batch
        "spacing": knobs["spacing"],
        "eta": knobs["eta"],
        "guidance_scale": knobs["guidance_scale"],
        "guidance_interval": knobs.get("guidance_interval"),
        "seed": seed,
    }
