"""One evaluation's numbers: torch-fidelity's FID, KID, IS and precision/recall
(:mod:`diffusion_core.evaluation.fidelity`) with half-sample intervals, the real-vs-real floor
at the same count, and the same quality class by class.

Per class: a model can be good on average and poor on one class (a digit it never learned, a
class the guidance collapses); the overall numbers hide that. FID (with its interval),
precision and recall of each class's samples against that class's reference images, on the
evaluation's features; classes with fewer than ``MIN_PER_CLASS`` samples or references on
either side are left out (their numbers would be noise). Metric names: ``class_fid/<k>``,
``class_fid_low/<k>``, ``class_fid_high/<k>``, ``class_precision/<k>``, ``class_recall/<k>``
for class index ``k``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from torch_fidelity import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_FID,
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
)

from diffusion_core.evaluation.fidelity import (
    MIN_IMAGES,
    Extractor,
    calculate,
    fid,
    half_sample_interval,
    kid,
    precision_recall,
)

MIN_PER_CLASS = 8  # per side: four a half for the interval, and k-NN balls for precision/recall
CLASS_METRICS = ("class_fid", "class_fid_low", "class_fid_high", "class_precision", "class_recall")


def per_class_scores(
    generated: Tensor,
    reference: Tensor,
    generated_labels: Tensor,
    reference_labels: Tensor,
    *,
    draws: int = 30,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Per-class FID, its interval, precision and recall of the feature rows ``generated``
    (labelled ``generated_labels``) against ``reference`` (``reference_labels``)."""
    if len(generated) != len(generated_labels) or len(reference) != len(reference_labels):
        raise ValueError("one label per feature row is needed on both sides")
    out: dict[str, float] = {}
    classes = sorted(set(generated_labels.tolist()) & set(reference_labels.tolist()))
    for k in classes:
        g, r = generated[generated_labels == k], reference[reference_labels == k]
        if min(len(g), len(r)) < MIN_PER_CLASS:
            continue
        low, high = half_sample_interval(fid, g, r, draws=draws, level=level, seed=seed + k)
        pr = precision_recall(g, r)
        out |= {
            f"class_fid/{k}": fid(g, r),
            f"class_fid_low/{k}": low,
            f"class_fid_high/{k}": high,
            f"class_precision/{k}": pr["precision"],
            f"class_recall/{k}": pr["recall"],
        }
    return out


def class_rows(metrics: dict[str, float], class_names: list[str]) -> list[dict[str, object]]:
    """The per-class metrics of an evaluation as one row a class (for the report)."""
    rows = []
    for k, name in enumerate(class_names):
        if f"class_fid/{k}" not in metrics:
            continue
        rows.append(
            {
                "class": name,
                "FID": metrics[f"class_fid/{k}"],
                "FID low": metrics[f"class_fid_low/{k}"],
                "FID high": metrics[f"class_fid_high/{k}"],
                "precision": metrics[f"class_precision/{k}"],
                "recall": metrics[f"class_recall/{k}"],
            }
        )
    return rows


def _around(centre: float, interval: tuple[float, float]) -> tuple[float, float]:
    """The interval's half-width around torch-fidelity's own estimate (the half-sample centre is
    the same statistic computed in float64, or one KID subset rather than the mean of 100)."""
    half_width = (interval[1] - interval[0]) / 2
    return centre - half_width, centre + half_width


def score(
    generated: Tensor,
    reference: Tensor,
    extractor: Extractor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    draws: int = 100,
    level: float = 0.95,
    seed: int = 0,
    labels: tuple[Tensor, Tensor] | None = None,
    keep_features: list[Tensor] | None = None,
) -> dict[str, float]:
    """Every number of one evaluation: torch-fidelity's FID, KID, IS and precision/recall, with
    intervals for FID and KID, and the real-vs-real floor. With ``keep_features``, the generated
    set's FID-layer features are appended to it (for comparisons between sets, e.g. the sweep's
    paired gap, without extracting them again).

    Intervals: the half-sample scheme of ``metrics.half_sample_interval`` (normal interval whose
    width comes from random halves of both sets drawn without replacement), not the plain
    bootstrap: resampling with replacement duplicates samples, which biases FID and KID upwards,
    so a percentile bootstrap interval can miss the estimate altogether.

    The floor: the reference set split in two disjoint halves, compared with each other at the
    same sample count h = min(generated, reference // 2) as ``fid_half`` (and ``kid_half``), the
    generated set's first h samples against the first half. ``fid_half_over_floor`` is the fair
    ratio; KID's floor is near zero, so it is compared as a difference.
    """
    tf = calculate(generated, reference, extractor, device=device, batch_size=batch_size, seed=seed)
    layer = extractor.layer("fid")
    g, r = tf.generated[layer], tf.reference[layer]
    if keep_features is not None:
        keep_features.append(g)
    kid_one = partial(kid, subsets=1, seed=seed)
    fid_c, kid_c = tf.raw[KEY_METRIC_FID], tf.raw[KEY_METRIC_KID_MEAN]
    fid_lo, fid_hi = _around(
        fid_c, half_sample_interval(fid, g, r, draws=draws, level=level, seed=seed)
    )
    kid_lo, kid_hi = _around(
        kid_c, half_sample_interval(kid_one, g, r, draws=draws, level=level, seed=seed)
    )
    # The floor: two disjoint halves of the reference, at the generated half's sample count.
    h = min(len(g), len(r) // 2)
    if h < MIN_IMAGES:
        raise ValueError(f"{len(r)} reference images: too few to split for the real-vs-real floor")
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
    ref_a, ref_b = r[perm[:h]], r[perm[h : 2 * h]]
    floor, fid_half = fid(ref_a, ref_b), fid(g[:h], ref_a)
    pr_floor = precision_recall(ref_b, ref_a)
    by_class: dict[str, float] = {}
    if labels is not None:  # the labels of (generated, reference): quality class by class
        by_class = per_class_scores(g, r, *labels, level=level, seed=seed)
    return by_class | {
        "fid": fid_c,
        "fid_low": fid_lo,
        "fid_high": fid_hi,
        "fid_half": fid_half,
        "fid_floor_half": floor,
        "fid_half_over_floor": fid_half / floor if floor > 0 else float("inf"),
        "kid": kid_c,
        "kid_low": kid_lo,
        "kid_high": kid_hi,
        "kid_half": kid(g[:h], ref_a, seed=seed),
        "kid_floor_half": kid(ref_a, ref_b, seed=seed),
        "inception_score": tf.raw[KEY_METRIC_ISC_MEAN],
        "precision": tf.raw[KEY_METRIC_PRECISION],
        "recall": tf.raw[KEY_METRIC_RECALL],
        "f_score": tf.raw[KEY_METRIC_F_SCORE],
        "precision_floor_half": pr_floor["precision"],
        "recall_floor_half": pr_floor["recall"],
        "num_samples": float(len(g)),
        "num_reference": float(len(r)),
        "num_half": float(h),
    }
