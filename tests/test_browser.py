"""The Space in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

An image is uploaded and segmented, a screenshot of the result is saved to
``test-artifacts/space_browser.png``, and a bad class list then shows a message instead of a traceback. A corrupt
upload shows the command line's message; a portrait phone photo (EXIF orientation 6) is segmented upright into
classes typed one per line (screenshot ``test-artifacts/space_browser_portrait.png``); clicking an example sets the
class preset that its classes are.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import (
    EXAMPLE_IMAGE,
    REPO_ROOT,
    save_exif_photo,
    serve_app,
    upright_test_picture,
    write_bad_image,
)
from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = REPO_ROOT / "test-artifacts" / "space_browser.png"
PORTRAIT_SCREENSHOT = REPO_ROOT / "test-artifacts" / "space_browser_portrait.png"
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


def open_page(playwright, url):
    browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#segment-button")
    return browser, page


@pytest.mark.slow
def test_a_corrupt_upload_shows_its_message(app_url, tmp_path):
    url, _ = app_url
    corrupt = write_bad_image(tmp_path, "notes.png")
    with sync_playwright() as playwright:
        browser, page = open_page(playwright, url)
        try:
            page.set_input_files("#input-image input[type=file]", str(corrupt))
            page.wait_for_selector("text=This image cannot be read")
            assert "cannot identify image file" in page.content()
            page.click("#segment-button")
            page.wait_for_selector("text=This image cannot be read")
            assert "Traceback" not in page.content()
        finally:
            browser.close()


@pytest.mark.slow
def test_a_portrait_photo_with_classes_on_separate_lines(app_url, tmp_path):
    url, _ = app_url
    photo = save_exif_photo(tmp_path / "portrait.jpg", upright_test_picture(60, 96), 6)
    assert Image.open(photo).size == (96, 60)  # stored sideways, as phones do
    PORTRAIT_SCREENSHOT.parent.mkdir(exist_ok=True)
    PORTRAIT_SCREENSHOT.unlink(missing_ok=True)
    with sync_playwright() as playwright:
        browser, page = open_page(playwright, url)
        try:
            page.set_input_files("#input-image input[type=file]", str(photo))
            page.wait_for_selector("#input-image img")
            page.fill("#class-text textarea", "circle\ntile\ngrass")
            page.click("#segment-button")
            page.wait_for_selector("#label-map a[download='label_map.png']")
            link = page.query_selector("#label-map a[download='label_map.png']")
            download = page.request.get(link.get_attribute("href"))
            (tmp_path / "label_map.png").write_bytes(download.body())
            assert Image.open(tmp_path / "label_map.png").size == (60, 96)  # upright: portrait
            table = page.inner_text("#fractions")
            assert "circle tile grass" not in table
            assert any(name in table for name in ("background", "circle", "tile", "grass"))
            page.screenshot(path=str(PORTRAIT_SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert PORTRAIT_SCREENSHOT.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_clicking_an_example_sets_its_class_preset(app_url):
    url, _ = app_url
    with sync_playwright() as playwright:
        browser, page = open_page(playwright, url)
        try:
            assert page.input_value("#class-preset input") == "PASCAL VOC"  # the tiny model saved no vocabulary
            examples = page.locator(".gallery-item, tbody tr")
            examples.nth(0).click()  # a toy-world image with the toy world's classes
            page.wait_for_function(
                "() => document.querySelector('#class-preset input').value === 'Toy world'")
            examples.nth(2).click()  # shapes: a class list of its own
            page.wait_for_function("() => document.querySelector('#class-preset input').value === 'Custom'")
        finally:
            browser.close()
