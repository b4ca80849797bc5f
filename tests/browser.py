"""Open a page in headless Chromium (Debian's ``chromium``, driven by Playwright) and say
what a reader would see: console errors, failed loads, images that did not decode."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# as root on a machine with no route out: no sandbox, and none of Chromium's background
# connections (each would be refused and logged)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Rendered:
    errors: list[str] = field(default_factory=list)  # console errors and warnings, page errors, failed requests
    images: list[dict] = field(default_factory=list)  # alt, complete, naturalWidth, naturalHeight
    headings: list[str] = field(default_factory=list)
    text: str = ""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium")
    return path


def render(page_path: Path, screenshot: Path) -> Rendered:
    """Load ``page_path`` (a file) in headless Chromium, wait for it, take a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    out = Rendered()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on(
                "console",
                lambda m: out.errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
            )
            page.on("pageerror", lambda e: out.errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: out.errors.append(f"failed to load {r.url[:120]}: {r.failure}"))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            out.images = page.evaluate("""Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                              width: i.naturalWidth, height: i.naturalHeight}))""")
            out.headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
            out.text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return out
