"""Inpainting evaluation: masks, masked-region error, seam score, the stage and its report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_core.config import ConfigError, InpaintEvalConfig, RunConfig, parse_config
from diffusion_core.evaluation import inpainting
from diffusion_core.evaluation.inpainting import (
    InpaintingError,
    Method,
    centre_mask,
    evaluate_inpainting,
    half_mask,
    inpainting_metrics,
    known_changed,
    masked_mse,
    score_inpainting,
    seam_score,
    standard_mask,
    stroke_mask,
)
from diffusion_core.io import psnr_from_mse
from diffusion_core.report.html import ReportData, write_report
from diffusion_core.sampling import SampleRequest
from tests.conftest import TINY, card_for

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(n: int, size: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


# ------------------------------------------------------------------------------------- masks


def test_centre_and_half_masks_by_hand():
    centre = centre_mask(16)
    assert centre.shape == (1, 1, 16, 16)
    assert int((centre == 0).sum()) == 64  # the 8x8 centre box
    assert bool((centre[..., 4:12, 4:12] == 0).all())
    half = half_mask(8)
    assert bool((half[..., :4] == 1).all()) and bool((half[..., 4:] == 0).all())


def test_stroke_masks_seeded_per_image():
    a = stroke_mask(4, 16, seed=1)
    assert a.shape == (4, 1, 16, 16)
    assert torch.equal(a, stroke_mask(4, 16, seed=1))
    assert not torch.equal(a, stroke_mask(4, 16, seed=2))
    assert not torch.equal(a[0], a[1])
    assert set(a.unique().tolist()) == {0.0, 1.0}
    unknown = (a == 0).float().mean().item()
    assert 0.05 < unknown < 0.7


def test_standard_mask_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'ring'"):
        standard_mask("ring", 2, 16)


# ----------------------------------------------------------------------------------- metrics


def test_perfect_inpainting_scores_zero_error():
    truth = _images(5, 8)
    mask = standard_mask("strokes", 5, 8, seed=3)
    score = score_inpainting(truth.clone(), truth, mask)
    assert score.mse == 0.0 and score.psnr == math.inf and score.known_changed == 0
    # The seam score of the real image is the reference statistic itself.
    assert score.seam == score.seam_real and score.seam_ratio == 1.0


def test_constant_fill_error_closed_form():
    a, b = 200, 50
    truth = torch.full((3, 1, 8, 8), a, dtype=torch.uint8)
    mask = centre_mask(8)
    filled = torch.where(mask == 1, truth, torch.full_like(truth, b))
    mse = masked_mse(filled, truth, mask)
    assert mse == pytest.approx(((a - b) / 255) ** 2, rel=1e-12)
    assert psnr_from_mse(mse, peak=1.0) == pytest.approx(-20 * math.log10((a - b) / 255), rel=1e-12)


def test_known_region_is_not_counted_in_the_error_but_in_known_changed():
    truth = _images(2, 8, channels=3)
    mask = half_mask(8)
    filled = truth.clone()
    filled[0, 1, 2, 1] ^= 1  # a known pixel, one channel
    filled[1, :, 5, 0] ^= 4  # a known pixel, three channels
    assert masked_mse(filled, truth, mask) == 0.0
    assert known_changed(filled, truth, mask) == 4


def test_seam_score_closed_forms():
    stripes = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    stripes[..., 1::2] = 255  # columns alternate 0 and 255
    half = half_mask(8)
    assert seam_score(stripes, half) == 1.0  # each boundary pair is (x3, x4) = (255, 0)
    assert seam_score(stripes.transpose(-1, -2), half) == 0.0  # rows alternate: pairs equal
    checker = ((torch.arange(8)[:, None] + torch.arange(8)) % 2 * 255).to(torch.uint8)
    assert seam_score(checker[None, None], centre_mask(8)) == 1.0
    # A step of 51 across the centre box's boundary on every side: 0.2 on [0, 1].
    box = torch.full((1, 1, 8, 8), 100, dtype=torch.uint8)
    box[..., 2:6, 2:6] = 151
    assert seam_score(box, centre_mask(8)) == pytest.approx(0.2)
    # Rows of 0, 10, 20, ...: across the box's 8 left/right pairs no step, across its 8
    # top/bottom pairs a step of 10, so the mean is 5 / 255.
    ramp = (torch.arange(8) * 10).to(torch.uint8)[:, None].expand(8, 8)[None, None]
    assert seam_score(ramp, centre_mask(8)) == pytest.approx(5 / 255)


def test_nfe_of_repaint_and_replacement():
    # 25 steps, a jump of 10 levels back resampled 10 times at two places: 25 + 2 * 9 * 10.
    assert Method("repaint", 10, 10).nfe(25) == 205
    assert Method("replacement", 1, 1).nfe(25) == 25


# -------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny_model():
    card = card_for(RunConfig.model_validate(TINY))
    torch.manual_seed(0)
    return card.build().eval(), card


EVAL = InpaintEvalConfig(enabled=True, num_images=3, jump_length=2, resample=2)


def test_evaluate_inpainting_rows(tiny_model):
    net, card = tiny_model
    images = _images(5, 8)
    result = evaluate_inpainting(net, card, SampleRequest(steps=4), images, EVAL, examples=2)
    rows = result.rows
    assert [(r["mask"], r["method"]) for r in rows] == [
        (m, k) for m in ("centre", "strokes", "half") for k in ("repaint", "replacement")
    ]
    for row in rows:
        assert row["known_changed"] == 0 and row["num_images"] == 3
        assert row["nfe"] == (4 if row["method"] == "replacement" else 6)  # 4 + 1 * 2
        assert 0 < row["mse"] < 1 and row["psnr"] == pytest.approx(
            psnr_from_mse(row["mse"], peak=1.0)
        )
        assert row["seam_ratio"] == pytest.approx(row["seam"] / row["seam_real"])
    # Per mask: 2 masked inputs (grey where unknown), 2 per method, then the 2 real images.
    ex = result.examples
    assert ex.shape == (3 * 4 * 2, 1, 8, 8) and ex.dtype == torch.uint8
    half = half_mask(8)
    assert torch.equal(ex[16:18], torch.where(half == 1, images[:2], 128))
    assert torch.equal(ex[22:24], images[:2])
    assert torch.equal(ex[18:20][..., :4], images[:2][..., :4])  # RePaint keeps the known half
    metrics = inpainting_metrics(rows)
    assert metrics["inpaint/known_region_exact"] == 1.0
    assert metrics["inpaint/half/repaint/psnr"] == rows[4]["psnr"]
    assert metrics["inpaint/strokes/seam_real"] == rows[2]["seam_real"]


def test_evaluate_inpainting_raises_when_known_region_changes(tiny_model, monkeypatch):
    net, card = tiny_model
    original = inpainting.inpaint

    def leaky(*args, **kwargs):
        out = original(*args, **kwargs)
        out[0, 0, 0, 0] ^= 1  # the corner is known under every standard mask here
        return out

    monkeypatch.setattr(inpainting, "inpaint", leaky)
    half = EVAL.model_copy(update={"masks": ("half",)})
    with pytest.raises(InpaintingError, match="changed 1 known pixel"):
        evaluate_inpainting(net, card, SampleRequest(steps=2), _images(2, 8), half)


def test_inpainting_config_is_strict():
    assert RunConfig().pipeline.inpainting.enabled is False
    with pytest.raises(ConfigError, match=r"pipeline\.inpainting\.resampel"):
        parse_config({"pipeline": {"inpainting": {"resampel": 3}}})
    with pytest.raises(ConfigError, match=r"pipeline\.inpainting\.resample"):
        parse_config({"pipeline": {"inpainting": {"resample": 1}}})
    with pytest.raises(ConfigError, match=r"pipeline\.inpainting\.masks"):
        parse_config({"pipeline": {"inpainting": {"masks": ["ring"]}}})
    with pytest.raises(ConfigError, match="distinct"):
        parse_config({"pipeline": {"inpainting": {"masks": ["half", "half"]}}})


def test_report_inpainting_section(tmp_path: Path, tiny_model):
    rows = [
        {
            "mask": "centre",
            "method": "repaint",
            "resample": 10,
            "nfe": 205,
            "psnr": 13.2,
            "mse": 0.048,
            "seam": 0.17,
            "seam_real": 0.16,
            "seam_ratio": 1.02,
            "known_changed": 0,
            "num_images": 32,
            "seconds": 11.7,
        },
        {
            "mask": "centre",
            "method": "replacement",
            "resample": 1,
            "nfe": 25,
            "psnr": 10.8,
            "mse": 0.084,
            "seam": 0.19,
            "seam_real": 0.16,
            "seam_ratio": 1.13,
            "known_changed": 0,
            "num_images": 32,
            "seconds": 1.4,
        },
    ]
    page = write_report(
        tmp_path / "r",
        ReportData(
            title="t",
            run_id="r",
            model_name="m",
            model_version="1",
            inpainting=rows,
            inpainting_examples=_images(12, 8),
        ),  # one mask: 4 rows of 3 images
    ).read_text()
    assert 'id="inpainting"' in page and "Seam / real" in page and "replacement" in page
    assert "equals the input exactly" in page and "32 holdout images" in page
    assert 'src="img/inpainting.png"' in page and "4 rows of 3 holdout images" in page
    with Image.open(tmp_path / "r" / "img" / "inpainting.png") as grid:
        assert grid.size == (4 * (3 * 9 + 1), 4 * (4 * 9 + 1))  # 1-pixel gaps, shown 4x
    rows[0]["known_changed"] = 3
    page = write_report(
        tmp_path / "b",
        ReportData(title="t", run_id="r", model_name="m", model_version="1", inpainting=rows),
    ).read_text()
    assert "3 known-region values differ" in page and "inpainting.png" not in page
    empty = write_report(
        tmp_path / "e", ReportData(title="t", run_id="r", model_name="m", model_version="1")
    ).read_text()
    assert 'id="inpainting"' not in empty
