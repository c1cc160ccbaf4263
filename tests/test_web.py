"""The web page end to end in a real headless Chromium (Debian ``chromium`` driven by Playwright).

The app runs under uvicorn on a free loopback port in a thread, over the same tiny run and
embedded PostgreSQL as the API tests. The test loads the page, browses, sets a profile and
context, gets recommendations, adds to the cart, and adds a product through the merchandiser form,
then saves a screenshot to ``runs/screenshots/web.png`` (or ``$ATELIER_SCREENSHOT_DIR/web.png``); then opens
the merchandiser's view of a product (``product.png``).
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
            # prices as a relative level, clearly labelled (H&M's own numbers are normalised)
            expect(page.locator("#results .card .price").first).to_contain_text("price level")

            # a ranked search, a misspelt word corrected
            page.fill("#q", "jersy top")
            page.click("#search-form button[type=submit]")
            expect(page.locator("#browse-status")).to_contain_text("items found")
            expect(page.locator("#browse-status")).to_contain_text('searched "jersey" for "jersy"')
            expect(page.locator("#browse-status")).to_contain_text("ranked by text + vector + popularity")
            page.fill("#q", "top")
            page.click("#search-form button[type=submit]")
            expect(page.locator("#browse-status")).not_to_contain_text("jersy")

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
            # one plain sentence per item; the model's detail behind "why?"
            expect(page.locator("#recs .card .why").first).to_contain_text("in your cart")
            detail = page.locator("#recs .card details.model").first
            expect(detail.locator("dl")).to_be_hidden()
            detail.locator("summary").click()
            expect(detail.locator("dl")).to_contain_text("content")
            expect(detail.locator("dl")).to_contain_text("item tower")

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
            # the enricher's attributes before the product goes live
            page.click("#preview-product")
            expect(page.locator("#merch-preview")).to_contain_text("would store (not live yet)")
            expect(page.locator("#merch-preview tr.origin-given").last).to_contain_text("green")
            page.click("#add-product")
            status = page.locator("#merch-status")
            expect(status).to_contain_text("Added web-new-1", timeout=20_000)
            expect(status).to_contain_text("appears at rank")
            expect(page.locator("#recs .card.new")).to_have_count(1)
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / "web.png"), full_page=True)

            # the merchandiser's view of a catalogue product: origins, colourways, neighbours, carts
            page.locator("#results .card .show-product").first.click()
            expect(page.locator("#product")).to_contain_text("Colourways")
            expect(page.locator("#product table.origins")).to_contain_text("columns")
            expect(page.locator("#product")).to_contain_text("Recommended most to these carts")
            page.locator("#product-panel").screenshot(path=str(SCREENSHOT_DIR / "product.png"))

            # a wrong key is refused with the server's message
            page.fill("#api-key", "wrong")
            page.fill("#new-id", "web-new-2")
            page.click("#add-product")
            expect(status).to_contain_text("wrong API key")

            assert not errors, errors
        finally:
            browser.close()
    assert (SCREENSHOT_DIR / "web.png").stat().st_size > 10_000
