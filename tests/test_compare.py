"""The promotion rule: rank only numbers whose metric records match, and say what differs."""

from __future__ import annotations

from diffusion_core.compare import RECORD_KEYS, decide, record_mismatch

RECORD = {
    "engine": "torch-fidelity 0.4.0", "extractor": "domain", "extractor_sha256": "a" * 64,
    "reference_sha256": "b" * 64, "reference_split": "holdout", "num_samples": 1000,
    "num_reference": 297, "sampler": "ddim", "steps": 25, "nfe": 25, "spacing": "leading",
    "eta": 0.0, "guidance_scale": 1.5, "seed": 0,
}  # fmt: skip


def evaluation(fid: float, half_width: float, **record: object) -> dict:
    return {
        "metrics": {"fid": fid, "fid_low": fid - half_width, "fid_high": fid + half_width},
        "record": {**RECORD, **record},
    }


def test_promotes_only_beyond_both_intervals():
    assert decide(evaluation(1.0, 0.1), None).promote
    assert decide(evaluation(1.0, 0.1), evaluation(2.0, 0.1)).promote
    tie = decide(evaluation(1.0, 0.3), evaluation(1.4, 0.3))
    assert not tie.promote and "tie" in tie.reason
    assert not decide(evaluation(2.0, 0.1), evaluation(1.0, 0.1)).promote


def test_refuses_to_rank_different_records_and_names_the_keys():
    for key in RECORD_KEYS:
        other = {**RECORD, key: "something else"}
        assert record_mismatch(RECORD, other) == [key]
    d = decide(evaluation(0.1, 0.01, extractor="inception-v3-compat", nfe=10), evaluation(9.0, 1))
    assert not d.promote
    assert "extractor: 'inception-v3-compat' vs 'domain'" in d.reason
    assert "nfe: 10 vs 25" in d.reason
    # An old record without the new keys is not comparable either.
    old = {k: v for k, v in RECORD.items() if k not in ("engine", "nfe")}
    assert record_mismatch(RECORD, old) == ["engine", "nfe"]
    # Seeds are recorded but do not block a comparison: the intervals carry sampling noise.
    assert decide(evaluation(1.0, 0.1, seed=7), evaluation(2.0, 0.1)).promote
