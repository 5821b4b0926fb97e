"""The admin page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium), against a
real gunicorn: log in, make a key and read it once, call a route with it, see its spend, block it, and read every
page at 360 px wide. Screenshots go to the test's own temporary folder."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Gunicorn, require
from upstream import Upstream

MASTER = "ui-browser-master-key-0123456789"
ALIAS = "browser <b>team</b>"
PHONE = {"width": 360, "height": 780, "deviceScaleFactor": 2, "mobile": True}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """A headless Chromium driven through chromedriver; .ci/run installs both (Debian's chromium, chromium-driver)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    require(bool(chromium and chromedriver), "chromium and chromedriver", "apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(chromium)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                     f"--user-data-dir={tmp_path / 'chromium'}", "--no-first-run", "--no-proxy-server"):  # fmt: skip
        options.add_argument(argument)
    service = Service(executable_path=str(chromedriver), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def poll(what: str, check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (bounded) until `check()` holds, on a page that may still be loading; fail naming `what`."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except (NoSuchElementException, StaleElementReferenceException):
            pass  # the next page is not there yet, or replaced the one an element was found on
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def test_an_operator_makes_a_key_sees_its_spend_and_blocks_it(
    browser: object, gunicorn: Callable[..., Gunicorn], upstream: Upstream, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver: Any = browser

    def arrive(title: str) -> None:  # a click or an Enter that loads a page returns before the page is there
        poll(f"the page {title!r}", lambda: driver.title.startswith(f"{title} ·"))

    route = {"path": "/v1/rerank", "target": f"{upstream.url}/v1/rerank", "auth": True, "cost_per_request": 0.25}
    server = gunicorn([route, {"path": "/open", "target": f"{upstream.url}/echo"}], master_key=MASTER)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        driver.save_screenshot(str(shots / f"{name}.png"))

    # Not logged in: the login page, whatever was asked for.
    driver.get(f"{server.url}/ui/usage")
    assert driver.current_url.endswith("/ui/login")
    shot("login")
    field = driver.find_element(By.ID, "key")
    field.send_keys("not-the-master-key", Keys.ENTER)
    poll(
        "the login refused",
        lambda: "That is not the master key." in driver.find_element(By.CSS_SELECTOR, ".error").text,
    )
    driver.find_element(By.ID, "key").send_keys(MASTER, Keys.ENTER)
    arrive("Keys")
    cookie = driver.get_cookie("passthru_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"

    # A new key, with a budget and the route ticked: shown once, with a copy button.
    driver.find_element(By.LINK_TEXT, "New key").click()
    arrive("New key")
    driver.find_element(By.ID, "key_alias").send_keys(ALIAS)
    driver.find_element(By.ID, "max_budget").send_keys("10")
    driver.find_element(By.ID, "rpm_limit").send_keys("600")
    driver.find_element(By.CSS_SELECTOR, "input[name=route][value='/v1/rerank']").click()
    driver.find_element(By.CSS_SELECTOR, ".key-form button[type=submit]").click()
    arrive("Key made")
    key = driver.find_element(By.ID, "new-key").get_attribute("value")
    assert key.startswith("sk-")
    driver.find_element(By.CSS_SELECTOR, "button[data-copy]").click()
    poll("the copy button says what it did", lambda: driver.find_element(By.CSS_SELECTOR, ".copied").text != "")
    shot("key-made")

    # Read once: no other page carries it.
    driver.find_element(By.LINK_TEXT, "Back to the keys").click()
    arrive("Keys")
    assert key not in driver.page_source
    row = driver.find_element(By.XPATH, f"//tr[td/a[normalize-space()='{ALIAS}']]")
    assert "0 of 10" in row.text and "600 rpm" in row.text and "/v1/rerank" in row.text and "active" in row.text

    # The key works on the auth: true route through gunicorn; its spend shows on the usage page and in its row.
    call = {"json": {"query": "q", "documents": ["d"]}, "headers": {"Authorization": f"Bearer {key}"}, "timeout": 10}
    assert requests.post(f"{server.url}/v1/rerank", **call).status_code == 200

    def usage_shows_the_call() -> bool:
        driver.get(f"{server.url}/ui/usage")
        rows = driver.find_elements(By.XPATH, f"//tr[th[normalize-space()='{ALIAS}']]")
        return bool(rows) and rows[0].text.split()[-3:-1] == ["0.25", "1"]

    poll("the call's spend on the usage page", usage_shows_the_call)
    assert "0.25" in driver.find_element(By.CSS_SELECTOR, ".summary").text
    shot("usage")
    driver.get(f"{server.url}/ui/keys")
    row = driver.find_element(By.XPATH, f"//tr[td/a[normalize-space()='{ALIAS}']]")
    assert "0.25 of 10" in row.text
    assert float(row.find_element(By.TAG_NAME, "meter").get_attribute("value")) == 0.25

    # Blocked from the page: the route answers 401 at once (the worker that blocked it forgets what it knew).
    row.find_element(By.XPATH, ".//button[starts-with(normalize-space(), 'Block')]").click()
    poll(
        "the key's row says blocked",
        lambda: "blocked" in driver.find_element(By.XPATH, f"//tr[td/a[normalize-space()='{ALIAS}']]").text,
    )
    shot("keys-blocked")
    assert requests.post(f"{server.url}/v1/rerank", **call).status_code == 401

    # The logs page lists the call under the key's alias; its request id leads to the entry.
    driver.get(f"{server.url}/ui/logs")
    entry = driver.find_element(By.XPATH, f"//tr[td[normalize-space()='{ALIAS}']]")
    assert "/v1/rerank" in entry.text and "200" in entry.text
    entry.find_element(By.CSS_SELECTOR, "td[data-label='Request id'] a").click()
    arrive("Log entry")
    assert ALIAS in driver.find_element(By.CSS_SELECTOR, "dl.facts").text

    # Every page at 360 px: nothing wider than the screen, and the key table in cards.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    for name in ("keys", "usage", "routes", "logs", "keys/new"):
        driver.get(f"{server.url}/ui/{name}")
        width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] == 360, (name, width)
        shot(f"phone-{name.replace('/', '-')}")
    driver.get(f"{server.url}/ui/keys")
    assert driver.find_element(By.CSS_SELECTOR, "table.cards tbody tr").value_of_css_property("display") == "block"
    assert driver.find_element(By.CSS_SELECTOR, "table.cards td").value_of_css_property("display") == "flex"

    # Keyboard only: Tab reaches the page's links and buttons, the skip link first.
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.get(f"{server.url}/ui/keys")
    reached = []
    for _ in range(30):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        focused = driver.switch_to.active_element
        reached.append(focused.text.strip() or focused.get_attribute("id"))
    assert reached[0] == "Skip to the content"
    assert {"Keys", "Usage", "Routes", "Logs", "Log out", "New key", "alias", "Filter"} <= set(reached), reached
    assert any(text.startswith("Unblock") for text in reached), reached
