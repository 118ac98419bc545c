"""Headless Chromium over the DevTools protocol, to check a page the way a reader sees it.

No browser-automation package: Chromium is started with ``--remote-debugging-port=0``, the port it
picked is read from ``DevToolsActivePort`` in its profile directory, and one websocket (the
``websockets`` package, a Prefect dependency) carries the protocol's JSON messages to a page
target in flattened-session mode.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--remote-debugging-port=0",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)

# Every <img>: whether it finished, and its decoded size (0 when it failed to load or decode).
_IMAGES_JS = """JSON.stringify(Array.from(document.images, i => ({
  src: i.getAttribute('src'), complete: i.complete,
  naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight})))"""


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools command failed or timed out."""


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


class Chromium:
    """A headless Chromium process and one DevTools connection to it; ``close`` kills it."""

    def __init__(self, executable: str, *, timeout: float = 30.0) -> None:
        self.executable = executable
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []  # protocol events, in arrival order
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Chromium:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="diffpipe-chromium-")
        profile = Path(self._profile.name)
        self._proc = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                code = self._proc.returncode
                raise BrowserError(f"{self.executable} exited {code}: {err[-2000:]}")
            if time.monotonic() > deadline:
                raise BrowserError(f"{self.executable}: no DevToolsActivePort in {self.timeout} s")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=self.timeout)

    def close(self) -> None:
        """Close the connection, kill the browser and remove its profile."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=10)
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        if self._ws is None:
            raise BrowserError("not connected")
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict[str, Any]:
        """The first event ``method`` of ``session``, kept or still to come."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._receive(deadline, method))

    def _receive(self, deadline: float, what: str) -> dict[str, Any]:
        assert self._ws is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"{what}: no answer in {self.timeout} s")
        try:
            return dict(json.loads(self._ws.recv(timeout=left)))
        except TimeoutError:
            raise BrowserError(f"{what}: no answer in {self.timeout} s") from None

    def evaluate(self, expression: str, session: str) -> Any:
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def check_page(self, url: str, screenshot: Path, *, width: int = 1280) -> PageReport:
        """Open ``url`` in a new tab, wait for every image (lazy ones too: the viewport is made as
        tall as the page), record failed requests and console errors, save a full-page PNG."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics, session)
        start = len(self.events)
        nav = self.send("Page.navigate", {"url": url}, session)
        if nav.get("errorText"):
            raise BrowserError(f"navigate {url}: {nav['errorText']}")
        self.wait_event("Page.loadEventFired", session)
        height = int(self.evaluate("document.documentElement.scrollHeight", session))
        self.send("Emulation.setDeviceMetricsOverride", {**metrics, "height": height}, session)
        deadline = time.monotonic() + self.timeout
        while not self.evaluate("Array.from(document.images).every(i => i.complete)", session):
            if time.monotonic() > deadline:
                break  # reported as broken images below
            time.sleep(0.05)
        images = json.loads(self.evaluate(_IMAGES_JS, session))
        title = str(self.evaluate("document.title", session))
        shot = self.send("Page.captureScreenshot", {"format": "png"}, session)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        self.send("Target.closeTarget", {"targetId": target})
        events = [e for e in self.events[start:] if e.get("sessionId") == session]
        return PageReport(
            url=url,
            title=title,
            images=images,
            failed_requests=_failed_requests(events),
            console_errors=_console_errors(events),
            screenshot=screenshot,
            size=(width, height),
        )


def _failed_requests(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Requests that failed, or answered with an HTTP error status."""
    urls = {
        e["params"]["requestId"]: e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    }
    failed = [
        {"url": urls.get(p["requestId"], "?"), "error": p.get("errorText", "")}
        for e in events
        if e.get("method") == "Network.loadingFailed"
        for p in [e["params"]]
    ]
    failed += [
        {"url": p["response"]["url"], "error": f"HTTP {p['response']['status']}"}
        for e in events
        if e.get("method") == "Network.responseReceived"
        for p in [e["params"]]
        if int(p["response"].get("status") or 0) >= 400
    ]
    return failed


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors and uncaught exceptions."""
    out = [
        str(e["params"]["entry"].get("text", ""))
        for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"
    ]
    out += [
        str(e["params"]["exceptionDetails"].get("text", ""))
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
    ]
    return out


def check_in_browser(path: Path, screenshot: Path, *, executable: str) -> PageReport:
    """Open the local file ``path`` in a fresh headless Chromium and report what it saw."""
    with Chromium(executable) as browser:
        return browser.check_page(path.resolve().as_uri(), screenshot)


def require_browser() -> bool:
    """True when a missing browser must fail the test (CI sets ``DIFFPIPE_REQUIRE_BROWSER=1``)."""
    return os.environ.get("DIFFPIPE_REQUIRE_BROWSER", "") not in ("", "0")
