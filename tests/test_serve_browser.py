"""The search page in a real browser: Debian's chromium driven by Selenium through chromium-driver.

Skipped where chromium, chromedriver or selenium is missing (``make test`` installs the first two
with apt-get when it runs as root: ``apt-get install chromium chromium-driver``). Set
``MORA_SERVE_SCREENSHOT=FILE`` to also save the page's screenshot there (docs/serve.png).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("selenium")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_world import build_shapes_index  # noqa: E402

from mora_retrieval.retrieval.encoder import load_encoder_from_source  # noqa: E402
from mora_retrieval.retrieval.index import load_index_folder  # noqa: E402
from mora_retrieval.retrieval.serve import background_server, create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    built = build_shapes_index(tmp_path_factory.mktemp("browser"))
    folder = load_index_folder(built["index"])
    encoder = load_encoder_from_source(folder.manifest["source"], device="cpu")
    app = create_app(folder, encoder, index_label="shapes-world/coco-val2017")
    with background_server(app) as url:
        yield {**built, "url": url, "folder": folder}


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,860", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _hits_shown(driver):
    return [(int(f.get_attribute("data-row")), float(f.get_attribute("data-score")))
            for f in driver.find_elements(By.CSS_SELECTOR, "#results figure.hit")]


def _wait_for_search(driver, number):
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.ID, "results").get_attribute("data-search") == str(number)
        or d.find_element(By.ID, "results").get_attribute("data-state") == "error")
    assert driver.find_element(By.ID, "results").get_attribute("data-state") == "done", \
        driver.find_element(By.ID, "error").text
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))


def test_upload_type_submit_and_click_a_hit(server, browser, tmp_path):
    query_image = server["coco"] / "val2017" / Path(server["folder"].items[7].path).name
    text, k = "make the circle blue", 8
    browser.get(server["url"])
    WebDriverWait(browser, 30).until(lambda d: "39 images" in d.find_element(By.ID, "info").text)
    assert "model mora-tiny" in browser.find_element(By.ID, "info").text

    browser.find_element(By.ID, "image-input").send_keys(str(query_image))
    browser.find_element(By.ID, "text-input").send_keys(text)
    k_input = browser.find_element(By.ID, "k-input")
    k_input.clear()
    k_input.send_keys(str(k))
    assert browser.find_element(By.ID, "query-preview").is_displayed()
    browser.find_element(By.ID, "search-button").click()
    _wait_for_search(browser, 1)

    shown = _hits_shown(browser)
    with open(query_image, "rb") as fh:
        api = httpx.post(server["url"] + "api/search", files={"image": (query_image.name, fh.read(), "image/jpeg")},
                         data={"text": text, "k": str(k)}).json()
    assert len(shown) == k
    assert shown == [(r["row"], r["score"]) for r in api["results"]]
    summary = browser.find_element(By.ID, "query-text").text
    assert summary.startswith("composed query: image " + query_image.name) and text in summary
    first = browser.find_element(By.CSS_SELECTOR, "#results figure.hit figcaption").text
    top = api["results"][0]
    assert f"#1 · {top['score']:.4f}" in first and f"id {top['image_id']}" in first
    names = httpx.get(server["url"] + "api/info").json()["categories"]
    assert names[str(top["categories"][0])] in first  # categories shown by name
    browser.save_screenshot(str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    if os.environ.get("MORA_SERVE_SCREENSHOT"):
        shutil.copyfile(tmp_path / "serve.png", os.environ["MORA_SERVE_SCREENSHOT"])

    # a click on a hit makes it the next query image, with the same text
    target = browser.find_elements(By.CSS_SELECTOR, "#results figure.hit")[2]
    row = int(target.get_attribute("data-row"))
    target.click()
    _wait_for_search(browser, 2)
    again = httpx.post(server["url"] + "api/search", data={"row": str(row), "text": text, "k": str(k)}).json()
    assert _hits_shown(browser) == [(r["row"], r["score"]) for r in again["results"]]
    assert browser.find_element(By.ID, "query-preview").get_attribute("src").endswith(f"/images/{row}")


def test_errors_are_shown_on_the_page(server, browser):
    browser.get(server["url"])
    browser.find_element(By.ID, "search-button").click()  # no image, no text
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert browser.find_element(By.ID, "error").text == "error: give a query: an image, a text, or both"
    bogus = Path(server["root"]) / "notes.png"
    bogus.write_bytes(b"not a picture at all" * 10)
    browser.find_element(By.ID, "image-input").send_keys(str(bogus))
    browser.find_element(By.ID, "search-button").click()
    WebDriverWait(browser, 30).until(lambda d: "not an image" in d.find_element(By.ID, "error").text)
    assert httpx.get(server["url"] + "healthz").json()["status"] == "ok"
