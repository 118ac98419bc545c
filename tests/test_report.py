"""Report figures and the HTML / markdown run report."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from matplotlib.axes import Axes
from PIL import Image

from diffusion_core.io import make_grid
from diffusion_core.report import charts, plots
from diffusion_core.report.html import (
    ReportData,
    report_link_markdown,
    report_markdown,
    write_report,
)
from diffusion_core.schedules import NoiseSchedule


def _images(n: int = 12, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def _history(n: int = 40, *, start: float = 1.0, end: float = 0.05) -> list[dict]:
    ratio = (end / start) ** (1 / (n - 1))
    return [{"step": 10 * i, "loss": start * ratio**i, "lr": 1e-3} for i in range(n)]


SWEEP: list[dict[str, object]] = [
    {"sampler": s, "nfe": n, "wall_seconds": n / 100, "fid": f, "fid_low": f - 1, "fid_high": f + 1}
    for s, base in (("ddim", 30.0), ("ddpm", 50.0))
    for n in (5, 10, 25)
    for f in [base / math.sqrt(n)]
]


def _open_png(path: Path, *, min_side: int = 100) -> Image.Image:
    assert path.is_file()
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert min(img.size) >= min_side, img.size
        return img.copy()


def _varied(img: Image.Image) -> bool:
    lo, hi = img.convert("L").getextrema()
    assert isinstance(lo, int) and isinstance(hi, int)
    return hi - lo > 50


# ------------------------------------------------------------------------------------ plots


def test_plot_schedules_writes_png(tmp_path: Path) -> None:
    out = plots.plot_schedules(tmp_path / "sub" / "s.png", num_steps=50, highlight="cosine")
    assert out == tmp_path / "sub" / "s.png"
    img = _open_png(out, min_side=200)
    assert img.width > 2 * img.height  # three panels side by side
    assert _varied(img)
    with pytest.raises(ValueError, match="unknown schedule"):
        plots.plot_schedules(tmp_path / "bad.png", num_steps=50, names=("nope",))


def test_plot_noise_progression_grid_and_noise(tmp_path: Path) -> None:
    schedule = NoiseSchedule.from_name("linear", 100)
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 2:6, 2:6] = 255
    out = plots.plot_noise_progression(tmp_path / "n.png", images, schedule, steps=(0, 50, 99))
    img = _open_png(out)
    # at most six rows, one column per step: taller than wide for 6 x 3 cells
    assert img.height > img.width
    few = plots.plot_noise_progression(tmp_path / "few.png", images[:2], schedule, steps=(0, 99))
    assert _open_png(few).height < img.height
    with pytest.raises(ValueError, match="outside"):
        plots.plot_noise_progression(tmp_path / "x.png", images, schedule, steps=(0, 100))


def test_plot_noise_progression_same_noise_per_row(tmp_path: Path) -> None:
    schedule = NoiseSchedule.from_name("cosine", 100)
    images = _images(3, size=8)
    a = plots.plot_noise_progression(tmp_path / "a.png", images, schedule, steps=(0, 60), seed=1)
    b = plots.plot_noise_progression(tmp_path / "b.png", images, schedule, steps=(0, 60), seed=1)
    c = plots.plot_noise_progression(tmp_path / "c.png", images, schedule, steps=(0, 60), seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_plot_loss_curve_linear_and_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scales: list[str] = []
    set_yscale = Axes.set_yscale

    def spy(self: Axes, value: str, **kwargs: object) -> None:
        scales.append(value)
        set_yscale(self, value, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Axes, "set_yscale", spy)
    flat = plots.plot_loss_curve(tmp_path / "flat.png", _history(start=0.2, end=0.1))
    assert "log" not in scales  # less than a decade: linear axis
    steep = plots.plot_loss_curve(tmp_path / "steep.png", _history(start=1.0, end=0.01))
    assert "log" in scales
    for out in (flat, steep):
        assert _varied(_open_png(out))
    no_lr = [{"step": r["step"], "loss": r["loss"]} for r in _history()]
    short = plots.plot_loss_curve(tmp_path / "nolr.png", no_lr)
    assert _open_png(short).height < _open_png(flat).height  # no learning-rate panel
    with pytest.raises(ValueError, match="no finite loss"):
        plots.plot_loss_curve(tmp_path / "empty.png", [{"step": 1, "loss": float("nan")}])


def test_ema_smooth() -> None:
    values = [1.0, 0.0, 0.0, 0.0]
    smooth = plots.ema_smooth(values, 0.5)
    assert smooth[0] == pytest.approx(1.0)  # debiased: starts at the first value
    assert list(smooth) == sorted(smooth, reverse=True)
    assert smooth[-1] > 0.0
    assert list(plots.ema_smooth(values, 0.0)) == values


def _grid_by_hand(images: torch.Tensor, nrow: int, pad: int, scale: int) -> torch.Tensor:
    """The sample grid's layout written out: ``nrow`` columns of tiles, ``pad`` black pixels
    around each, empty cells black, then every pixel repeated ``scale`` times each way."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("n", "nrow", "pad", "scale"),
    [(5, None, 1, 1), (5, 3, 1, 2), (7, 2, 2, 1), (1, None, 1, 1), (2, 4, 1, 3), (9, 1, 0, 1)],
)
def test_make_grid_keeps_the_layout(n, nrow, pad, scale, channels) -> None:
    images = _images(n, size=3, channels=channels, seed=n) | 1  # no tile is black at the edge
    grid = make_grid(images, nrow=nrow, pad=pad, scale=scale)
    expected = _grid_by_hand(images, nrow or math.ceil(math.sqrt(n)), pad, scale)
    assert grid.dtype == torch.uint8 and grid.shape == expected.shape
    assert torch.equal(grid, expected)


def test_plot_sample_grid_conditional_rows(tmp_path: Path) -> None:
    images = _images(30, size=8)
    labels = torch.arange(30) % 3
    names = ["zero", "one", "two"]
    cond = plots.plot_sample_grid(
        tmp_path / "c.png", images, labels=labels, class_names=names, per_class=4, scale=4
    )
    img = _open_png(cond, min_side=50)
    # three rows of 4 tiles of (8 + 1) * 4 px, plus labels on the left
    assert img.height >= 3 * 8 * 4
    assert img.width > 4 * 8 * 4
    assert img.height < img.width
    square = plots.plot_sample_grid(tmp_path / "sq.png", images[:16], scale=4)
    sq = _open_png(square, min_side=50)
    assert abs(sq.width - sq.height) < 0.2 * sq.width
    with pytest.raises(ValueError, match="labels"):
        plots.plot_sample_grid(tmp_path / "bad.png", images, labels=labels[:5])


def test_plot_sample_grid_rgb(tmp_path: Path) -> None:
    out = plots.plot_sample_grid(tmp_path / "rgb.png", _images(9, size=8, channels=3), scale=4)
    assert _varied(_open_png(out, min_side=50))


def test_plot_metric_vs_cost(tmp_path: Path) -> None:
    out = charts.plot_metric_vs_cost(tmp_path / "m.png", SWEEP)
    assert _varied(_open_png(out))
    wall = charts.plot_metric_vs_cost(tmp_path / "w.png", SWEEP, cost="wall_seconds")
    _open_png(wall)
    with pytest.raises(ValueError, match="no rows"):
        charts.plot_metric_vs_cost(tmp_path / "none.png", SWEEP, metric="kid")


# ----------------------------------------------------------------------------------- report


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.section_ids: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.rows: list[list[str]] = []  # table rows, each a list of cell texts
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []
        if tag == "img":
            self.imgs.append(a)
        if tag == "section" and a.get("id"):
            self.section_ids.append(str(a["id"]))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


HOSTILE_RUN_ID = 'x"><img src=q onerror=alert(1)>'
HOSTILE_CLASS = "<script>alert(1)</script>"
HOSTILE_NAME = "<script>x</script>"


def _full_report(**overrides: object) -> ReportData:
    n = 40
    data: dict = {
        "title": "Nightly <run> & friends",
        "run_id": HOSTILE_RUN_ID,
        "model_name": "digits",
        "model_version": "3",
        "config": {
            "data": {"kind": "digits"},
            "model": {"channel_mults": (1, 2)},
            "k": HOSTILE_NAME,
        },
        "metrics": {"fid": 12.345, "kid": 0.0123},
        "intervals": {"fid": (11.5, 13.25)},
        "history": _history(),
        "samples": _images(n, size=8),
        "labels": torch.arange(n) % 4,
        "class_names": [HOSTILE_CLASS, "b", "c", "d"],
        "real_images": _images(4, size=8, seed=1),
        "schedule_name": "cosine",
        "num_steps": 100,
        "safety": {
            "published": 37,
            "quarantined": 3,
            "flag_rates": {"blank": 0.05, HOSTILE_NAME: 0.5},
        },
        "comparison": [
            {"metric": "fid", "challenger": 12.3, "champion": 14.0},
            {"metric": HOSTILE_NAME, "challenger": 1.0},
        ],
        "sweep": SWEEP,
        "notes": ["promoted <b>now</b>"],
    }
    data.update(overrides)
    return ReportData(**data)


def _bare_report(**fields: object) -> ReportData:
    """A report with only ``fields`` filled in (cheap: no figures unless asked for)."""
    return ReportData(title="t", run_id="r", model_name="m", model_version="1", **fields)  # type: ignore[arg-type]


def _parse(index: Path) -> tuple[_Page, str]:
    source = index.read_text(encoding="utf-8")
    page = _Page()
    page.feed(source)
    return page, source


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _Page, str]:
    out = tmp_path_factory.mktemp("report") / "report"
    index = write_report(out, _full_report())
    assert index == out / "index.html"
    page, source = _parse(index)
    return out, page, source


def test_write_report_images_are_relative_and_exist(full_report: tuple[Path, _Page, str]) -> None:
    out, page, source = full_report
    assert len(page.imgs) == 6  # samples, 2 sweep, loss, schedules, noise progression
    for img in page.imgs:
        src = img.get("src")
        assert src, img
        assert not urlparse(src).scheme and not src.startswith(("/", "//")), src
        target = (out / src).resolve()
        assert target.is_relative_to(out.resolve()) and target.is_file(), src
        Image.open(target).verify()
        assert img.get("alt"), f"{src} has no alt text"
    # self-contained: nothing fetched from elsewhere
    assert "<script" not in source
    assert "<link" not in source
    assert "http://" not in source and "https://" not in source
    assert "<style>" in source
    assert "image-rendering: pixelated" in source
    assert any(i.get("class") == "pixelated" for i in page.imgs)
    assert "details" in page.tags  # config collapsed


def test_write_report_escapes_user_strings(full_report: tuple[Path, _Page, str]) -> None:
    _, page, source = full_report
    assert HOSTILE_CLASS not in source
    assert HOSTILE_NAME not in source
    # comparison table, safety table and config all show it, escaped
    assert source.count("&lt;script&gt;x&lt;/script&gt;") >= 3
    assert "Nightly <run>" not in source
    assert "Nightly &lt;run&gt; &amp; friends" in source
    assert "promoted <b>now</b>" not in source
    assert "promoted &lt;b&gt;now&lt;/b&gt;" in source
    assert HOSTILE_RUN_ID not in source
    assert all(i.get("src") != "q" for i in page.imgs)
    # the escaped text reads back as the original string
    assert HOSTILE_RUN_ID in "".join(page.text)


def _section(source: str, anchor: str) -> _Page:
    start = source.index(f'<section id="{anchor}">')
    page = _Page()
    page.feed(source[start : source.index("</section>", start)])
    return page


def test_write_report_metrics_with_intervals(
    full_report: tuple[Path, _Page, str], tmp_path: Path
) -> None:
    _, _, source = full_report
    rows = _section(source, "metrics").rows
    assert rows == [
        ["Metric", "Value", "95% interval"],
        ["FID fid", "12.35", "[11.5, 13.25]"],
        ["KID kid", "0.0123", ""],
    ]
    # without intervals there is no interval column
    index = write_report(tmp_path, _bare_report(metrics={"fid": 12.345}))
    section = _section(index.read_text(), "metrics")
    assert section.rows == [["Metric", "Value"], ["FID fid", "12.35"]]
    assert "interval" not in " ".join(section.text)


def test_write_report_omits_empty_sections(
    full_report: tuple[Path, _Page, str], tmp_path: Path
) -> None:
    _, full, _ = full_report
    assert set(full.section_ids) == {
        "metrics",
        "notes",
        "samples",
        "comparison",
        "safety",
        "sweep",
        "training",
        "schedule",
        "config",
    }
    out = tmp_path / "empty"
    page, source = _parse(write_report(out, _bare_report()))
    assert page.section_ids == []
    assert page.imgs == []
    assert "Quality against cost" not in source
    assert not list((out / "img").glob("*.png"))
    rows = [{"metric": "fid", "challenger": 1.0, "champion": 2.0}]
    some, _ = _parse(write_report(tmp_path / "some", _bare_report(comparison=rows, notes=["n"])))
    assert some.section_ids == ["notes", "comparison"]


def test_write_report_unconditional_samples_without_real_images(tmp_path: Path) -> None:
    report = _bare_report(samples=_images(9), schedule_name="linear", num_steps=50)
    page, _ = _parse(write_report(tmp_path, report))
    assert [i["src"] for i in page.imgs] == ["img/samples.png", "img/schedules.png"]
    assert page.section_ids == ["samples", "schedule"]
    # a later report without figures in the same folder leaves no stale ones behind
    write_report(tmp_path, _bare_report())
    assert not list((tmp_path / "img").glob("*.png"))


def test_report_markdown() -> None:
    url = "s3://bucket/runs/run-42/report/index.html"
    md = report_markdown(_full_report(), report_url=url)
    lines = md.splitlines()
    assert not any(line.startswith("    ") or line.startswith("\t") for line in lines)
    assert f"`{url}`" in md  # object storage: the URL and how to fetch it, not a dead link
    assert lines[0].startswith("# ")
    assert any(line.startswith("| FID |") and "11.5" in line for line in lines)
    assert "published 37" in md and "quarantined 3" in md and "5.0%" in md
    assert "<run>" not in md and "&lt;run&gt;" in md
    minimal = report_markdown(_bare_report(), report_url=url)
    assert "| Metric" not in minimal and "Safety" not in minimal and url in minimal


def test_write_report_promotion_decision(tmp_path: Path) -> None:
    kept = {"promoted": False, "reason": "FID 4.7 vs 4.9: <a tie>", "previous_champion": "2"}
    page, source = _parse(write_report(tmp_path / "kept", _bare_report(promotion=kept)))
    assert page.section_ids == ["comparison"]  # the decision alone makes the section
    section = _section(source, "comparison")
    text = " ".join(t.strip() for t in section.text if t.strip())
    assert text.startswith("Comparison with champion Not promoted: v2 stays champion")
    assert "FID 4.7 vs 4.9: <a tie>" in text and "<a tie>" not in source
    assert 'class="decision"' in source and "decision promoted" not in source
    first = {"promoted": True, "reason": "no champion yet", "previous_champion": None}
    _, source = _parse(write_report(tmp_path / "first", _bare_report(promotion=first)))
    assert "Promoted to champion</div>" in source and 'class="decision promoted"' in source
    replaced = {"promoted": True, "reason": "FID 3 beats 5", "previous_champion": "4"}
    _, source = _parse(write_report(tmp_path / "won", _bare_report(promotion=replaced)))
    assert "Promoted to champion, replacing v4" in source
    again = {"promoted": False, "reason": "a tie", "previous_champion": "1"}  # _bare_report is v1
    _, source = _parse(write_report(tmp_path / "again", _bare_report(promotion=again)))
    assert "v1 is the champion</div>" in source
    # with version rows, the rule is stated above the table
    rows = [{"version": 2, "aliases": "champion", "FID low": 3.1, "decision": "champion"}]
    _, source = _parse(write_report(tmp_path / "rows", _bare_report(comparison=rows)))
    section = _section(source, "comparison")
    assert section.rows[0] == ["Version", "Aliases", "FID low", "Decision"]
    assert "whole FID interval lies below" in source


def test_write_report_explains_the_floor(tmp_path: Path) -> None:
    metrics = {"fid": 4.7, "fid_half": 5.0, "fid_floor_half": 4.3, "fid_half_over_floor": 1.16}
    _, source = _parse(write_report(tmp_path / "floor", _bare_report(metrics=metrics)))
    rows = _section(source, "metrics").rows
    assert rows[1:] == [
        ["FID fid", "4.7"],
        ["FID (half sample) fid_half", "5"],
        ["FID floor (real vs real) fid_floor_half", "4.3"],
        ["FID / floor fid_half_over_floor", "1.16"],
    ]
    assert "two halves of the real holdout set" in source
    _, source = _parse(write_report(tmp_path / "plain", _bare_report(metrics={"fid": 4.7})))
    assert "holdout" not in source


def test_report_link_markdown_local_and_s3(tmp_path: Path) -> None:
    folder = tmp_path / "a dir (1)" / "report"
    local = report_link_markdown(f"file://{folder}/index.html")
    quoted = str(folder).replace(" ", "%20").replace("(", "%28").replace(")", "%29")
    assert local == f"[Open the full report](file://{quoted}/index.html)"
    # the link target is the file: no spaces or parentheses left to end the markdown link
    target = local[local.index("](") + 2 : -1]
    assert urlparse(target).scheme == "file"
    from urllib.parse import unquote

    assert Path(unquote(urlparse(target).path)) == folder / "index.html"
    s3 = report_link_markdown("s3://bucket/diffpipe/runs/r1/report/index.html")
    assert "](" not in s3  # a browser cannot open s3://: no dead link
    assert "`s3://bucket/diffpipe/runs/r1/report/index.html`" in s3
    assert "aws s3 cp --recursive s3://bucket/diffpipe/runs/r1/report/ report/" in s3
    assert report_link_markdown("https://h/r/index.html") == (
        "[Open the full report](https://h/r/index.html)"
    )
