"""The page in a real browser: Debian's chromium and chromium-driver, driven with selenium.

Create: type a prompt, set the width, press Generate, wait for the image, fetch it as the page's download link
does and check it decodes at the requested size with the settings in its text chunks. Chat: attach an image, send
a message, see the answer. A screenshot of each view is written to the test's tmp folder, or with
OMNIGEN2_WRITE_SCREENSHOTS=1 to docs/images/ (the ones docs/APP.md shows). The browser cannot resolve any host
but 127.0.0.1, so the page is shown to work offline.

Without the browser the test skips, with its reason; under OMNIGEN2_REQUIRE_BROWSER=1 (.ci/run) it fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import PIL.Image
import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
WAIT_S = 120  # the longest wait for one thing in the page (the app's first call on a loaded 2-core machine)


def _browser() -> tuple[str, str] | str:
    """(browser, driver) paths, or why they cannot be had."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    binary = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        return "no chromium / chromedriver on PATH (apt-get install -y chromium chromium-driver)"
    return binary, driver


@pytest.fixture(scope="module")
def driver():
    found = _browser()
    if isinstance(found, str):
        if os.environ.get("OMNIGEN2_REQUIRE_BROWSER") == "1":
            pytest.fail(f"OMNIGEN2_REQUIRE_BROWSER=1 but {found}")
        pytest.skip(found)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1100",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # offline: no CDN, no analytics
    ):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver_path), options=options)
    d.set_page_load_timeout(WAIT_S)
    yield d
    d.quit()


def _shots_dir(tmp_path: Path) -> Path:
    if os.environ.get("OMNIGEN2_WRITE_SCREENSHOTS") == "1":
        return REPO / "docs" / "images"
    return tmp_path


def _wait(d, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(d, WAIT_S, poll_frequency=0.5).until(condition)
    except TimeoutException:
        page = d.find_element("tag name", "body").text
        raise AssertionError(f"no {what} after {WAIT_S} s; page text:\n{page}") from None


def _set_number(d, css: str, value: int) -> None:
    """Type a value into a slider's number box (as a user does) and leave the box so the slider takes it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.CSS_SELECTOR, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_create_and_chat_in_a_real_browser(driver, app, tmp_path):  # driver first: skip before the app starts
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = driver
    shots = _shots_dir(tmp_path)
    d.get(app.url)
    prompt = _wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"), "prompt box")

    # -- Create: a prompt, two images per prompt, a height of 96 (the model's native size is 64), Generate ------
    prompt.send_keys("a red square at the top left")
    _set_number(d, "#create-num-images input[type=number]", 2)
    _set_number(d, "#create-height input[type=number]", 96)
    t0 = time.monotonic()
    d.find_element(By.CSS_SELECTOR, "#generate-button").click()
    _wait(d, lambda d: "Seed 0: 2 image(s) of 64x96" in d.find_element(By.ID, "create-status").text, "status")
    took = time.monotonic() - t0
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img")) == 2, "two result images")
    for k, img in enumerate(d.find_elements(By.CSS_SELECTOR, "#results img")):
        with urllib.request.urlopen(img.get_attribute("src"), timeout=30) as r:  # what the download button saves
            png = PIL.Image.open(io.BytesIO(r.read()))
            png.load()
        assert png.format == "PNG" and png.size == (64, 96), (png.format, png.size)
        params = json.loads(png.text["parameters"])
        assert params["prompt"] == "a red square at the top left" and params["height"] == 96
        assert params["seed"] == 0 and params["index"] == k
    # "Use as input": pick the second result, send it to the input images
    d.find_elements(By.CSS_SELECTOR, "#results img")[1].click()
    d.find_element(By.CSS_SELECTOR, "#use-as-input").click()
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#input-images img"), "the result among the input images")
    d.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    d.save_screenshot(str(shots / "app_create.png"))
    print(f"Create: Generate to images shown in {took:.1f} s")

    # An example that suits the model: the README's edit, on the model's own drawing made at start-up
    example = d.find_element(By.XPATH, "//*[normalize-space(text())='move the red square to the bottom right']")
    d.execute_script("arguments[0].scrollIntoView(); arguments[0].click()", example)
    _wait(d, lambda d: "bottom right" in prompt.get_attribute("value"), "the example's prompt")
    assert prompt.get_attribute("value") == "move the red square to the bottom right"
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#input-images img")) == 1, "the example's input")

    # -- Chat: attach an image, ask about it, see the answer ----------------------------------------------------
    tab = next(b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Chat")
    tab.click()
    upload = _wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#chat-input input[type=file]"), "chat upload")
    source = tmp_path / "drawn.png"
    png.convert("RGB").save(source)
    upload.send_keys(str(source))
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-input img"), "attached thumbnail")
    box = d.find_element(By.CSS_SELECTOR, "#chat-input textarea")
    box.send_keys("describe the image.")
    box.send_keys(Keys.ENTER)

    def answered(d):
        bots = d.find_elements(By.CSS_SELECTOR, "#chatbot .bot, #chatbot [data-testid=bot]")
        text = " ".join(b.text for b in bots)
        return text if "square" in text else None

    answer = _wait(d, answered, "chat answer")
    assert "red square" in answer
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#chatbot img"), "the user's image in the thread")

    # A drawing with one reflection round: the verdict shows in the thread, with the drawing.
    _set_number(d, "#chat-reflect input[type=number]", 1)
    box.send_keys("a red square on a sky background", Keys.ENTER)
    _wait(d, lambda d: "Reflection 1" in d.find_element(By.ID, "chatbot").text, "reflection round")
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chatbot img")) >= 2, "the drawing in the thread")
    time.sleep(1.0)  # let the thread finish scrolling before the picture
    d.save_screenshot(str(shots / "app_chat.png"))
    assert app.alive()
