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
4. **Guardrails**: and no guarded metric is worse than the champion's beyond its tolerance
   (``promotion:``: precision, recall, conditional accuracy may fall, the memorisation and
   safety flag rates may rise, each by at most its tolerance). A lower FID bought with more
   memorised or more quarantined samples is not a better model.

Every rule's verdict (``Verdict``) is part of the decision, for the report and ``compare``.

Evaluations are ``{"metrics": {...}, "record": {...}}`` as written by the evaluation stage; the
metrics must hold ``fid``, ``fid_low`` and ``fid_high``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from diffusion_core.config import PromotionConfig

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


# Guarded metrics: (metric, config field, +1 when higher is better, -1 when lower is).
GUARDRAILS = (
    ("precision", "precision_drop", +1),
    ("recall", "recall_drop", +1),
    ("conditional_accuracy", "conditional_accuracy_drop", +1),
    ("memorisation_flag_rate", "memorisation_rise", -1),
    ("safety_flag_rate", "safety_flag_rise", -1),
)
# Record keys a new dataset changes (the holdout, and the judge trained on it): an evaluation
# that differs from another only in these can be repeated on the other's terms.
REFERENCE_KEYS = ("reference_sha256", "num_reference", "extractor_sha256")


@dataclass(frozen=True)
class Verdict:
    """One rule on one pair of evaluations: the values compared, the allowed change, and
    whether the challenger passed (None: not judged, a side lacks the metric)."""

    rule: str
    challenger: float | None
    champion: float | None
    limit: str
    passed: bool | None

    def text(self) -> str:
        if self.passed is None:
            return f"{self.rule}: not measured"
        mark = "ok" if self.passed else "FAILED"
        return f"{self.rule} {self.challenger:.4g} vs {self.champion:.4g} ({self.limit}): {mark}"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    verdicts: tuple[Verdict, ...] = field(default=())

    def rules(self) -> list[dict[str, Any]]:
        return [asdict(v) for v in self.verdicts]


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


def decide(
    challenger: dict[str, Any],
    champion: Champion | None,
    rules: PromotionConfig | None = None,
) -> Decision:
    """Promote when there is no champion, or when the challenger's FID interval is entirely below
    the champion's on a matching record and no guardrail of ``rules`` fails; otherwise keep the
    champion and say why."""
    if champion is None:
        return Decision(True, "no champion yet")
    if champion.evaluation is None:
        return Decision(
            False, f"not comparable: the champion (version {champion.version}) was never evaluated"
        )
    return _decide(challenger, champion.evaluation, rules or PromotionConfig())


def reevaluable(challenger: dict[str, Any], champion: Champion | None) -> bool:
    """Whether the champion's evaluation differs from the challenger's only in the reference
    data or the judge, so that evaluating the champion again on the challenger's terms makes
    the two comparable."""
    if champion is None or champion.evaluation is None:
        return False
    differ = record_mismatch(challenger.get("record", {}), champion.evaluation.get("record", {}))
    return bool(differ) and set(differ) <= set(REFERENCE_KEYS)


def guardrail_verdicts(
    challenger: Mapping[str, Any], champion: Mapping[str, Any], rules: PromotionConfig
) -> list[Verdict]:
    """The guardrails of ``rules`` on two metric sets."""
    out = []
    for metric, knob, sign in GUARDRAILS:
        tolerance = getattr(rules, knob)
        if tolerance is None:
            continue
        c, k = challenger.get(metric), champion.get(metric)
        word = "fall" if sign > 0 else "rise"
        limit = f"{word} at most {tolerance:g}"
        if c is None or k is None:
            out.append(Verdict(metric, c, k, limit, None))
            continue
        worse_by = (k - c) * sign  # how much worse the challenger is
        out.append(Verdict(metric, float(c), float(k), limit, worse_by <= tolerance + 1e-12))
    return out


def _decide(
    challenger: dict[str, Any], champion: dict[str, Any], rules: PromotionConfig
) -> Decision:
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
    fid_ok = c["fid_high"] < k["fid_low"]
    fid = Verdict("fid", c["fid"], k["fid"], "interval entirely below the champion's", fid_ok)
    guards = guardrail_verdicts(c, k, rules)
    verdicts = (fid, *guards)
    failed = [v for v in guards if v.passed is False]
    if fid_ok and not failed:
        return Decision(
            True, f"FID {c['fid']:.3f} beats {k['fid']:.3f} beyond both intervals", verdicts
        )
    if fid_ok:
        broken = "; ".join(v.text() for v in failed)
        return Decision(
            False,
            f"FID {c['fid']:.3f} beats {k['fid']:.3f}, but guardrails failed: {broken}",
            verdicts,
        )
    if c["fid"] < k["fid"]:
        return Decision(
            False, f"FID {c['fid']:.3f} vs {k['fid']:.3f}: within the intervals, a tie", verdicts
        )
    return Decision(False, f"FID {c['fid']:.3f} is not better than {k['fid']:.3f}", verdicts)


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
