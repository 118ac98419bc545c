"""Champion / challenger: when a new model may replace the current best one.

Two evaluations are comparable only when their metric records match (same feature extractor and
weights, reference set, sample count and sampling settings). The challenger wins only when it is
better beyond the uncertainty: its FID interval lies entirely below the champion's.
"""

from __future__ import annotations

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
)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def record_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The record keys on which two evaluations differ (missing keys count as differing)."""
    return [k for k in RECORD_KEYS if str(a.get(k)) != str(b.get(k))]


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None) -> Decision:
    """Promote when there is no champion, or when the challenger's FID interval is entirely below
    the champion's on a matching record; otherwise keep the champion and say why."""
    if champion is None:
        return Decision(True, "no champion yet")
    differ = record_mismatch(challenger["record"], champion["record"])
    if differ:
        values = "; ".join(
            f"{k}: {challenger['record'].get(k)!r} vs {champion['record'].get(k)!r}" for k in differ
        )
        return Decision(False, f"not comparable: metric records differ in {values}")
    c, k = challenger["metrics"], champion["metrics"]
    if c["fid_high"] < k["fid_low"]:
        return Decision(True, f"FID {c['fid']:.3f} beats {k['fid']:.3f} beyond both intervals")
    if c["fid"] < k["fid"]:
        return Decision(False, f"FID {c['fid']:.3f} vs {k['fid']:.3f}: within the intervals, a tie")
    return Decision(False, f"FID {c['fid']:.3f} is not better than {k['fid']:.3f}")
