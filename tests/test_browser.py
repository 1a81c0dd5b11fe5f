"""The Space in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

An image is uploaded and segmented, a screenshot of the result is saved to
``test-artifacts/space_browser.png``, and a bad class list then shows a message instead of a traceback.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import EXAMPLE_IMAGE, REPO_ROOT, serve_app
from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = REPO_ROOT / "test-artifacts" / "space_browser.png"
TIMEOUT_MS = 60_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Chromium is not installed: scripts/setup.sh installs the Debian package 'chromium'")
    return path


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_model_dir):
    model_dir = tiny_model_dir
    with serve_app(model_dir, tmp_path_factory.mktemp("browser_log") / "app.log") as url:
        yield url, model_dir


@pytest.mark.slow
def test_upload_segment_and_screenshot_in_headless_chromium(app_url):
    url, model_dir = app_url
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            assert str(model_dir) in page.inner_text("#model-status")

            page.set_input_files("#input-image input[type=file]", str(EXAMPLE_IMAGE))
            page.wait_for_selector("#input-image img")
            page.fill("#class-text textarea", "circle, tile, grass")
            page.click("#segment-button")
            page.wait_for_selector("#overlay img")
            link = page.wait_for_selector("#label-map a[download='label_map.png']")
            download = page.request.get(link.get_attribute("href"))
            assert download.ok and download.body()[:8] == PNG_SIGNATURE
            table = page.inner_text("#fractions")
            assert "pixels (%)" in table and any(name in table for name in ("background", "circle", "tile", "grass"))
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            page.fill("#class-text textarea", " , ")
            page.click("#segment-button")
            page.wait_for_selector("text=Enter at least one class name")
            assert "Traceback" not in page.content()
        finally:
            browser.close()
    assert SCREENSHOT.read_bytes()[:8] == PNG_SIGNATURE
