"""Headless Chromium through Playwright, to check a page the way a reader sees it.

Playwright drives the system's Chromium (``executable_path``), so nothing is downloaded: no
``playwright install`` is needed or run.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_core.settings import settings

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Every <img>: whether it finished, and its decoded size (0 when it failed to load or decode).
_IMAGES_JS = """Array.from(document.images, i => ({
  src: i.getAttribute('src'), complete: i.complete,
  naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))"""
_ALL_IMAGES_DONE_JS = "Array.from(document.images).every(i => i.complete)"


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    """What the browser saw: every image, every failed request, console errors, a screenshot."""

    url: str
    title: str
    images: list[dict[str, Any]]
    failed_requests: list[dict[str, str]]
    console_errors: list[str]
    screenshot: Path
    size: tuple[int, int]  # CSS px of the whole page: (width, height)

    @property
    def broken_images(self) -> list[str]:
        return [str(i["src"]) for i in self.images if not i["complete"] or i["naturalWidth"] <= 0]

    @property
    def problems(self) -> list[str]:
        """Everything that would make the page look wrong; empty for a good page."""
        return (
            [f"image did not load: {src}" for src in self.broken_images]
            + [f"request failed: {r['url']} ({r['error']})" for r in self.failed_requests]
            + [f"console: {text}" for text in self.console_errors]
        )


def check_in_browser(
    path: Path, screenshot: Path, *, executable: str, width: int = 1280, timeout: float = 30.0
) -> PageReport:
    """Open the local file ``path`` in a fresh headless Chromium, wait for every image (lazy ones
    too: the viewport is made as tall as the page), record failed requests (and HTTP errors) and
    console errors, and save a full-page screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url = path.resolve().as_uri()
    failed: list[dict[str, str]] = []
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, timeout=timeout * 1000)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(timeout * 1000)
            page.on("requestfailed", lambda r: failed.append({"url": r.url, "error": r.failure}))
            page.on(
                "response",
                lambda r: (
                    r.status >= 400 and failed.append({"url": r.url, "error": f"HTTP {r.status}"})
                ),
            )
            page.on("console", lambda m: m.type == "error" and console.append(m.text))
            page.on("pageerror", lambda e: console.append(str(e)))
            page.goto(url, wait_until="load")
            height = int(page.evaluate("document.documentElement.scrollHeight"))
            page.set_viewport_size({"width": width, "height": height})
            with contextlib.suppress(PlaywrightTimeout):  # reported as broken images below
                page.wait_for_function(_ALL_IMAGES_DONE_JS)
            images = page.evaluate(_IMAGES_JS)
            title = page.title()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
    return PageReport(url, title, images, failed, console, screenshot, (width, height))


def require_browser() -> bool:
    """True when a missing browser must fail the test (CI sets ``DIFFPIPE_REQUIRE_BROWSER=1``)."""
    return settings().require_browser
