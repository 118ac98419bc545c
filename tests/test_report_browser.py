"""The full run report opened in headless Chromium (driven by Playwright): every image loads,
nothing fails, and a screenshot is kept to look at (copied to ``$DIFFPIPE_SCREENSHOT_DIR`` when
that is set).

Without Chromium (or Playwright) the tests skip, unless ``DIFFPIPE_REQUIRE_BROWSER=1`` (CI), where
they fail.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_core.report.html import ReportData, write_report
from diffusion_core.settings import settings
from tests.browser import CHROMIUM_NAMES, check_in_browser, find_chromium, require_browser

NUM_CLASSES, PER_CLASS, SIZE = 10, 12, 16


def chromium() -> str:
    """The browser, or a skip (a failure when the browser is required)."""
    path = find_chromium()
    if path is not None and importlib.util.find_spec("playwright") is not None:
        return path
    reason = (
        f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})"
        if path is None
        else "the playwright package is not installed"
    )
    if require_browser():
        pytest.fail(f"DIFFPIPE_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(f"{reason}; install chromium to check the report in a browser")


def class_images(labels: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Small uint8 images whose class shows: a ring whose radius grows with the label and a bar
    at an angle set by it, with a little noise. (N, 1, SIZE, SIZE)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    yc, xc = ys - (SIZE - 1) / 2, xs - (SIZE - 1) / 2
    images = []
    for label in labels.tolist():
        radius = 2.0 + 0.5 * label
        ring = ((yc**2 + xc**2).sqrt() - radius).abs() < 0.9
        angle = math.pi * label / NUM_CLASSES
        bar = (yc * math.cos(angle) - xc * math.sin(angle)).abs() < 0.7
        img = 0.9 * ring.float() + 0.6 * bar.float() + 0.15 * torch.rand(SIZE, SIZE, generator=g)
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(images)[:, None]


def full_report() -> ReportData:
    """A report with every section, shaped like the pipeline's (``make_report``)."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    history = [
        {"step": s, "loss": 0.08 + 0.9 * math.exp(-s / 150) * (1 + 0.1 * math.sin(s)), "lr": 2e-4}
        for s in range(10, 1001, 10)
    ]
    sweep = [
        {
            "sampler": sampler,
            "nfe": nfe,
            "wall_seconds": nfe * cost,
            "fid": fid,
            "fid_low": 0.8 * fid,
            "fid_high": 1.2 * fid,
        }
        for sampler, base, cost in (
            ("ddpm", 60.0, 0.05),
            ("ddim", 25.0, 0.05),
            ("dpmpp_2m", 12.0, 0.05),
        )
        for nfe in (5, 10, 25, 50)
        for fid in [4.3 + base / nfe]
    ]
    comparison = [
        {
            "version": v,
            "aliases": a,
            "FID": fid,
            "FID low": fid - 1.8,
            "FID high": fid + 1.8,
            "FID floor": 4.3,
            "cond. accuracy": acc,
            "decision": d,
            "reason": r,
        }
        for v, a, fid, acc, d, r in (
            (1, "", 9.8, 0.95, "keep champion", "FID 9.800 is not better than 4.900"),
            (2, "champion", 4.9, 0.99, "champion", "the current champion"),
            (
                3,
                "challenger",
                4.73,
                0.997,
                "keep champion",
                "FID 4.730 vs 4.900: within the intervals, a tie",
            ),
        )
    ]
    return ReportData(
        title="quickstart v3",
        run_id="0123456789abcdef0123456789abcdef",
        model_name="quickstart",
        model_version="3",
        config={
            "name": "quickstart",
            "data": {"kind": "digits", "image_size": SIZE},
            "sample": {"sampler": "ddim", "steps": 25, "guidance_scale": 1.5},
        },
        metrics={
            "fid": 4.73,
            "fid_half": 5.02,
            "fid_floor_half": 4.30,
            "fid_half_over_floor": 1.17,
            "kid": 0.0012,
            "inception_score": 9.61,
            "judge_holdout_accuracy": 0.9966,
            "num_samples": 1000.0,
            "conditional_accuracy": 0.997,
        },
        intervals={"fid": (2.93, 6.53), "kid": (0.0004, 0.0021)},
        history=history,
        samples=class_images(labels, seed=0),
        labels=labels,
        class_names=[str(k) for k in range(NUM_CLASSES)],
        real_images=class_images(torch.arange(6), seed=1),
        schedule_name="cosine",
        num_steps=1000,
        safety={
            "published": 996,
            "quarantined": 4,
            "flag_rates": {"invalid": 0.001, "memorisation": 0.003},
        },
        comparison=comparison,
        sweep=sweep,
        notes=[],
        promotion={
            "promoted": False,
            "previous_champion": "2",
            "reason": "FID 4.730 vs 4.900: within the intervals, a tie",
        },
    )


def keep_screenshot(path: Path) -> None:
    folder = settings().screenshot_dir
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / path.name)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full report, written once for the module."""
    return write_report(tmp_path_factory.mktemp("report") / "report", full_report()).parent


def test_report_renders_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    browser = chromium()
    index = report_dir / "index.html"
    seen = check_in_browser(index, tmp_path / "report-screenshot.png", executable=browser)
    keep_screenshot(seen.screenshot)

    assert seen.problems == []
    assert seen.title == "quickstart v3"
    # every figure, decoded by the browser at the size of the PNG on disk
    names = [
        "samples",
        "metric_trend",
        "sweep_nfe",
        "sweep_wall",
        "loss",
        "schedules",
        "noise_progression",
    ]
    assert [i["src"] for i in seen.images] == [f"img/{n}.png" for n in names]
    for img in seen.images:
        with Image.open(report_dir / img["src"]) as png:
            assert (img["naturalWidth"], img["naturalHeight"]) == png.size, img
    # the screenshot is the whole page, and not blank
    with Image.open(seen.screenshot) as shot:
        assert shot.format == "PNG"
        assert shot.size == seen.size and shot.height > 3000
        lo, hi = shot.convert("L").getextrema()
        assert hi - lo > 200


def test_browser_check_catches_a_missing_image(report_dir: Path, tmp_path: Path) -> None:
    browser = chromium()
    broken = shutil.copytree(report_dir, tmp_path / "report")
    (broken / "img" / "loss.png").unlink()
    seen = check_in_browser(broken / "index.html", tmp_path / "broken.png", executable=browser)
    assert seen.broken_images == ["img/loss.png"]
    failed = [r["url"] for r in seen.failed_requests]
    assert failed == [(broken / "img" / "loss.png").as_uri()]
    assert len(seen.problems) >= 2


def test_missing_browser_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "find_chromium", lambda: None)
    monkeypatch.delenv("DIFFPIPE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium on PATH"):
        chromium()
    monkeypatch.setenv("DIFFPIPE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="DIFFPIPE_REQUIRE_BROWSER is set"):
        chromium()
