"""/docs the way a person meets it: app.py serving, a real headless Chromium (Debian's, driven
by Playwright) loading the page, every operation rendered, and "Try it out" on POST
/predict answered 200 (the browser sends the page's own Origin, which must be let through)."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.processes import finish, start, wait_ready

CHROMIUM = shutil.which("chromium")
# The flags a closed network needs: no background connections, no first-run or update checks.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def served(tiny_bundle: Path) -> Iterator[str]:
    process, url = start(tiny_bundle)
    wait_ready(process, url)
    yield url
    process.send_signal(signal.SIGTERM)
    code, output = finish(process, 20)
    assert code == 0 and "Traceback" not in output


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_docs_renders_every_operation(served: str, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(f"{served}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    rendered = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.getAttribute('data-path'))")
    spec = page.request.get(f"{served}/openapi.json").json()
    assert sorted(rendered) == sorted(spec["paths"])
    assert "Unable to render" not in page.content()
    page.close()


def test_try_it_out_on_predict_is_answered(served: str, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(f"{served}/docs")
    operation = page.locator("#operations-default-post_predict")
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for(timeout=15_000)
    assert status.inner_text().strip() == "200"
    assert (
        "intent_name" in operation.locator(".live-responses-table tbody .response-col_description").first.inner_text()
    )
    page.close()
