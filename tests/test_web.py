"""The web page end to end in a real headless Chromium (Debian ``chromium`` driven by Playwright).

The app runs under uvicorn on a free loopback port in a thread, over the same tiny run and
embedded PostgreSQL as the API tests. The test loads the page, browses, sets a profile and
context, gets recommendations, adds to the cart, and adds a product through the merchandiser form,
then saves a screenshot to ``runs/screenshots/web.png`` (or ``$ATELIER_SCREENSHOT_DIR/web.png``).
Never ``playwright install``: the browser is the Debian package (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from atelier.config import Settings
from atelier.serve.app import create_app
from atelier.serve.service import RecommendService
from tests.helpers import API_KEY, build_tiny_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# The run folder of the checkout (a build artifact CI can keep), not the test's temp folder.
SCREENSHOT_DIR = Path(os.environ.get("ATELIER_SCREENSHOT_DIR")
                      or Path(__file__).resolve().parents[1] / "runs" / "screenshots")


def free_port() -> int:
    """A port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[str]:
    """The app under a real uvicorn in a thread; yields its URL."""
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright==1.65.2)")
    settings: Settings = build_tiny_run(tmp_path_factory.getbasetemp() / "serve-run", data_dir)
    service = RecommendService(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, service=service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


def test_page_profile_recommend_and_add_product(base_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM if CHROMIUM.is_file() else shutil.which("chromium")),
                                     args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base_url)
            page.wait_for_selector("body[data-ready='1']", timeout=20_000)
            expect(page.locator("#results .card").first).to_be_visible()
            expect(page.locator("#ready")).to_contain_text("content")

            # search with a category picked from /meta
            page.fill("#q", "top")
            page.click("#search-form button[type=submit]")
            expect(page.locator("#browse-status")).to_contain_text("items found")

            # a profile and an occasion, no cart: popularity answers (content has nothing to start from)
            page.fill("#height", "168")
            page.fill("#weight", "60")
            page.fill("#age", "31")
            page.click("#recommend-btn")
            expect(page.locator("#recs .card").first).to_be_visible()
            expect(page.locator("#rec-status")).to_contain_text('stage "popularity"')

            # add an item to the cart, with a context: content answers, explanations name shared attributes
            page.locator("#results .card .add-cart").first.click()
            expect(page.locator("#cart li")).to_have_count(1)
            page.fill("#context", "black top for a party")
            page.click("#recommend-btn")
            expect(page.locator("#rec-status")).to_contain_text('stage "content"')
            expect(page.locator("#rec-status")).to_contain_text("context understood as")
            expect(page.locator("#recs .card .why").first).to_contain_text("close to your cart")

            # similar items of a result
            page.locator("#results .card .show-similar").first.click()
            expect(page.locator("#similar .card").first).to_be_visible()

            # the merchandiser adds a product; the page shows it live in recommendations
            page.fill("#api-key", API_KEY)
            page.fill("#new-id", "web-new-1")
            page.fill("#new-title", "Emerald satin slip dress")
            page.fill("#new-desc", "Bias-cut midi slip dress in green satin with narrow adjustable straps.")
            page.select_option("#new-category", "04onepiece_01dress")
            page.select_option("#new-color", "green")
            page.fill("#new-price", "0.05")
            page.click("#add-product")
            status = page.locator("#merch-status")
            expect(status).to_contain_text("Added web-new-1", timeout=20_000)
            expect(status).to_contain_text("appears at rank")
            expect(page.locator("#recs .card.new")).to_have_count(1)
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / "web.png"), full_page=True)

            # a wrong key is refused with the server's message
            page.fill("#api-key", "wrong")
            page.fill("#new-id", "web-new-2")
            page.click("#add-product")
            expect(status).to_contain_text("wrong API key")

            assert not errors, errors
        finally:
            browser.close()
    assert (SCREENSHOT_DIR / "web.png").stat().st_size > 10_000
