"""A headless Chromium driven by Playwright's Python package, for the report page's tests.

The browser is Debian's chromium (`apt-get install chromium`: /usr/bin/chromium), or the
Chromium or Chrome binary that COTEXNET_CHROMIUM names; Playwright's own browser download is
never used. Where none is found the tests skip with one line; CI (.ci/run) installs chromium
and sets COTEXNET_REQUIRE_BROWSER=1, which turns that skip into a failure.

The network guard (tests/netguard) patches Python's sockets, in this process and in Python
subprocesses; Playwright talks to its Node driver and the driver to the browser through pipes,
so the guard neither blocks nor sees them, and the browser (not Python) is outside it. So the
browser runs with its background services off and every host name resolving nowhere, and
`open_page` records every request a page makes: a test fails if one is not a file: or data: URL.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BROWSER_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
                "--host-resolver-rules=MAP * ~NOTFOUND"]
LOCAL_SCHEMES = ("file:", "data:")


def chromium_path() -> str | None:
    named = os.environ.get("COTEXNET_CHROMIUM")
    if named:
        return named
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _unavailable(reason: str):
    if os.environ.get("COTEXNET_REQUIRE_BROWSER") == "1":
        pytest.fail(f"COTEXNET_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for the module's tests, or a one-line skip saying why there is none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright's Python package is not installed (pip install -r requirement.txt)")
    path = chromium_path()
    if path is None:
        _unavailable("no Chromium found (apt-get install chromium, or COTEXNET_CHROMIUM=/path/to/chrome)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=BROWSER_ARGS)
        yield launched
        launched.close()


@dataclass
class OpenedPage:
    """A page opened from disk, with what it logged and requested."""

    page: object
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    requests: list[str] = field(default_factory=list)  # every URL the page asked for

    @property
    def remote(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(LOCAL_SCHEMES)]


def open_page(browser, html: Path) -> OpenedPage:
    """`html` opened from file:// in a fresh context, every image loaded (lazy ones too)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    opened = OpenedPage(page)
    page.on("console", lambda message: opened.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    page.on("request", lambda request: opened.requests.append(request.url))
    page.goto(Path(html).resolve().as_uri())
    page.evaluate("document.querySelectorAll('img').forEach(img => { img.loading = 'eager'; })")
    page.wait_for_function("Array.from(document.images).every(img => img.complete)")
    return opened


def card_names(page) -> list[str]:
    """The names of the gallery's visible cards, in the order shown."""
    return page.eval_on_selector_all("#gallery .card:not([hidden])", "cards => cards.map(c => c.dataset.name)")
