"""The web page end to end in a real headless Chromium (Debian ``chromium`` driven by Playwright).

The app runs under uvicorn on a free loopback port in a thread, over the same tiny run and embedded PostgreSQL
as the API tests, with a real evaluation report of the harness on that run. The test loads the page, searches,
sets a profile and context, gets recommendations for a cart with their plain reasons, opens the merchandiser's
view of a recommended product, adds a product through the merchandiser form, and reads the evaluation section.
Screenshots are test artifacts under the pytest temp folder (``<basetemp>/screenshots/``: ``cart.png``,
``product.png``, ``web.png``, ``evaluation.png``).

The README's two screenshots (a shopper's cart with reasons, a merchandiser's product view) come from this test:
``ATELIER_README_SCREENSHOTS=docs .venv/bin/pytest -q tests/serve/test_web.py`` also writes ``docs/screenshot-cart.png``
and ``docs/screenshot-product.png`` (256 colours, each under 300 KB).
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
from tests.helpers import API_KEY, build_tiny_run, write_evaluation

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Where the README's screenshots go when asked for (relative paths from the checkout root); None: not written.
_readme = os.environ.get("ATELIER_README_SCREENSHOTS")
README_SHOTS = (Path(__file__).resolve().parents[2] / _readme) if _readme else None
README_MAX_BYTES = 300_000


def free_port() -> int:
    """A port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The screenshots of this run: test artifacts in the pytest temp folder."""
    folder = tmp_path_factory.getbasetemp() / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


def readme_copy(shot: Path, name: str) -> None:
    """With ``ATELIER_README_SCREENSHOTS`` set, a copy of a screenshot for the README in 256 colours (UI text
    stays sharp, the file small)."""
    if README_SHOTS is None:
        return
    from PIL import Image

    README_SHOTS.mkdir(parents=True, exist_ok=True)
    out = README_SHOTS / name
    with Image.open(shot) as image:
        image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(out, optimize=True)
    assert out.stat().st_size < README_MAX_BYTES, f"{out} is {out.stat().st_size:,} bytes"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[str]:
    """The app under a real uvicorn in a thread, with an evaluation report in its run; yields its URL."""
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright==1.65.2)")
    settings: Settings = build_tiny_run(tmp_path_factory.getbasetemp() / "serve-run", data_dir)
    write_evaluation(settings)
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


def test_page_shopper_merchandiser_and_evaluation(base_url: str, shots: Path) -> None:
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
            expect(page.locator("#rec-for")).to_be_hidden()

            # a shopper's cart, with a context: content answers, one plain sentence per item naming the cart
            first = page.locator("#results .card").first
            cart_title = first.locator("h4").inner_text()
            first.locator(".add-cart").click()
            expect(page.locator("#cart li")).to_have_count(1)
            page.fill("#context", "black top for a party")
            page.click("#recommend-btn")
            expect(page.locator("#rec-status")).to_contain_text('stage "content"')
            expect(page.locator("#rec-status")).to_contain_text("context understood as")
            expect(page.locator("#rec-for")).to_have_text(f'For your cart: {cart_title} · asked for "black top for '
                                                          'a party"')
            expect(page.locator("#recs .card .why").first).to_contain_text("in your cart")
            assert all("bought" not in r for r in page.locator("#recs .card .why").all_inner_texts()), \
                "an anonymous cart is never told what it bought"
            # the model's detail behind "why?"
            detail = page.locator("#recs .card details.model").first
            expect(detail.locator("dl")).to_be_hidden()
            detail.locator("summary").click()
            expect(detail.locator("dl")).to_contain_text("content")
            expect(detail.locator("dl")).to_contain_text("item tower")
            page.locator("#recommendations").screenshot(path=str(shots / "cart.png"))
            readme_copy(shots / "cart.png", "screenshot-cart.png")

            # the merchandiser's view of a product just recommended: origins, colourways, neighbours, and the
            # cart it was recommended to (from the service's log)
            page.fill("#api-key", API_KEY)
            page.locator("#recs .card .show-product").first.click()
            product = page.locator("#product")
            expect(product).to_contain_text("Colourways")
            expect(product.locator("table.origins")).to_contain_text("columns")
            expect(product).to_contain_text("Recommended most to these carts")
            expect(product.locator("ul.carts")).to_contain_text(cart_title)
            page.locator("#product-panel").screenshot(path=str(shots / "product.png"))
            readme_copy(shots / "product.png", "screenshot-product.png")

            # similar items of a result
            page.locator("#results .card .show-similar").first.click()
            expect(page.locator("#similar .card").first).to_be_visible()

            # the merchandiser adds a product; the page shows it live in recommendations
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
            expect(page.locator("#rec-for")).to_contain_text("For a shopper describing")

            # evaluation at a glance: a table per cohort, the baselines and the served chain marked, the plots
            evaluation = page.locator("#evaluation")
            expect(evaluation.locator("p.split")).to_contain_text("Validation split")
            expect(evaluation.locator("p.split")).to_contain_text("users scored")
            for cohort in ("all", "history", "new"):
                table = evaluation.locator(f".cohort[data-cohort='{cohort}'] table.eval")
                for i, column in enumerate(("model", "MAP@12", "Recall@100")):
                    expect(table.locator("th").nth(i)).to_have_text(column)
                expect(table.locator("tr.role-baseline")).to_have_count(2)
                expect(table.locator("tr.role-baseline .tag")).to_have_text(["baseline", "baseline"])
                expect(table.locator("tr.role-served")).to_contain_text("atelier")
                expect(table.locator("tr.role-served .tag")).to_have_text("served")
            expect(evaluation.locator(".cohort[data-cohort='all'] tr.role-baseline td:first-child")).to_contain_text(
                ["popularity", "rules"])
            expect(evaluation.locator(".plots img")).to_have_count(2)
            evaluation.locator(".plots").scroll_into_view_if_needed()
            page.wait_for_function("[...document.querySelectorAll('#evaluation .plots img')]"
                                   ".every((img) => img.complete && img.naturalWidth > 0)", timeout=10_000)
            evaluation.screenshot(path=str(shots / "evaluation.png"))
            page.screenshot(path=str(shots / "web.png"), full_page=True)

            # a wrong key is refused with the server's message
            page.fill("#api-key", "wrong")
            page.fill("#new-id", "web-new-2")
            page.click("#add-product")
            expect(status).to_contain_text("wrong API key")

            assert not errors, errors
        finally:
            browser.close()
    for name in ("cart.png", "product.png", "evaluation.png", "web.png"):
        assert (shots / name).stat().st_size > 10_000, name
