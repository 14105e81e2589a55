"""The web UI in a real browser (Debian's chromium + chromium-driver, driven by selenium, headless).

Screenshots are written to the test's tmp dir (printed with -s)."""
from __future__ import annotations

import shutil
import time

import pytest

from serving import XSS_TITLE, gated_engine, running

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium", reason="selenium not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed "
                "(apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver import Chrome, ChromeOptions  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with gated_engine(tmp_path_factory.mktemp("ui") / "store", max_new_tokens=12) as eng:
        yield eng


@pytest.fixture(scope="module")
def base(engine):
    from blockrag.server import create_app

    with running(create_app(engine.config, engine)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _ask(driver, question: str, max_tokens: int = 12, k: str | None = None):
    q = driver.find_element(By.ID, "question")
    q.clear()
    q.send_keys(question)
    mt = driver.find_element(By.ID, "max-tokens")
    mt.clear()
    mt.send_keys(str(max_tokens))
    if k is not None:
        kk = driver.find_element(By.ID, "k")
        kk.clear()
        kk.send_keys(k)
    driver.find_element(By.ID, "ask").click()


def _state(driver):
    return driver.execute_script(
        "const a = document.getElementById('answer'); return [a.dataset.state, a.textContent];")


def _wait_done(driver, timeout=120):
    samples = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, text = _state(driver)
        samples.append((state, text))
        if state in ("done", "error"):
            return samples
        time.sleep(0.03)
    raise AssertionError(f"no answer within {timeout}s; last state {samples[-1]}")


def _open(driver, base):
    driver.get(base + "/")
    WebDriverWait(driver, 30).until(lambda d: "documents" in d.find_element(By.ID, "server-info").text)


def test_answer_streams_with_citations_and_timings(browser, base, tmp_path):
    _open(browser, base)
    _ask(browser, "Who founded the Veloria Savings Bank?")
    samples = _wait_done(browser)
    final_state, final_text = samples[-1]
    assert final_state == "done" and final_text.strip()
    partial = [t for s, t in samples if s == "streaming" and t.strip()]
    assert partial, "no token was shown before the answer completed"
    assert len(partial[0]) < len(final_text)  # the first text seen was only a part of the answer
    assert len({t for t in partial}) >= 2  # and it grew while streaming
    items = browser.find_elements(By.CSS_SELECTOR, "#citations li")
    assert items and items[0].find_element(By.CLASS_NAME, "cite-head").text == "Veloria Savings Bank"
    assert "bank.md" in items[0].find_element(By.CLASS_NAME, "cite-meta").text
    marks = browser.find_elements(By.CSS_SELECTOR, "#citations mark")
    assert marks and marks[0].text.strip()  # the cited span is highlighted
    timings = browser.find_element(By.ID, "timings").text
    assert "TTFT" in timings and "cached" in timings and "tok/s" in timings and "retrieve" in timings
    browser.save_screenshot(str(tmp_path / "answer.png"))
    print(f"\nscreenshot {tmp_path / 'answer.png'}; timings: {timings}")


def test_document_text_is_shown_as_text_not_html(browser, base, tmp_path):
    _open(browser, base)
    _ask(browser, "What does the harbour master of Lisk keep?", max_tokens=3)
    _wait_done(browser)
    heads = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#citations .cite-head")]
    assert XSS_TITLE in heads  # the markup is visible as characters
    texts = " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, "#citations .cite-text"))
    assert "<script>window.__xss=2</script>" in texts
    assert browser.execute_script("return window.__xss === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#citations img, #citations script, #citations b")
    docs = browser.execute_script("return document.getElementById('documents').textContent")
    assert "<b>notes</b>" in docs
    browser.save_screenshot(str(tmp_path / "xss.png"))


def test_server_errors_are_shown(browser, base, engine, tmp_path):
    _open(browser, base)
    browser.execute_script("document.getElementById('k').removeAttribute('max')")  # past the form's own check
    _ask(browser, "Who founded the bank?", k="99")  # refused by the server (k <= 50)
    assert _wait_done(browser)[-1][0] == "error"
    err = browser.find_element(By.ID, "error")
    assert err.is_displayed() and "k" in err.text and "invalid request" in err.text
    engine.generator.fail_on = "EXPLODE"
    try:
        _ask(browser, "EXPLODE the Veloria Savings Bank", k="2")
        assert _wait_done(browser)[-1][0] == "error"
        assert "injected failure" in browser.find_element(By.ID, "error").text
        browser.save_screenshot(str(tmp_path / "error.png"))
    finally:
        engine.generator.fail_on = None
    _ask(browser, "Who founded the Veloria Savings Bank?", max_tokens=2)  # the next question works again
    assert _wait_done(browser)[-1][0] == "done"
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_upload_and_delete_from_the_page(browser, base, tmp_path):
    note = tmp_path / "ferry.md"
    note.write_text("# The ferry\nThe ferry Saltwing sails from Lisk to Corvane at dawn.\n")
    _open(browser, base)
    browser.find_element(By.CSS_SELECTOR, "#docs-panel summary").click()
    browser.find_element(By.ID, "upload").send_keys(str(note))
    browser.find_element(By.ID, "upload-btn").click()
    WebDriverWait(browser, 180).until(lambda d: "1 added" in d.find_element(By.ID, "docs-status").text
                                      or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    WebDriverWait(browser, 30).until(lambda d: "The ferry — ferry.md" in d.find_element(By.ID, "documents").text)
    row = [li for li in browser.find_elements(By.CSS_SELECTOR, "#documents li") if "ferry.md" in li.text][0]
    row.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(browser, 60).until(lambda d: "deleted ferry.md" in d.find_element(By.ID, "docs-status").text)
    assert "ferry.md" not in browser.find_element(By.ID, "documents").text


def test_phone_width(browser, base, tmp_path):
    browser.set_window_size(390, 844)
    try:
        _open(browser, base)
        _ask(browser, "Who founded the Veloria Savings Bank?", max_tokens=4)
        _wait_done(browser)
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"page is {overflow}px wider than a phone screen"
        assert browser.find_element(By.ID, "ask").is_displayed()
        browser.save_screenshot(str(tmp_path / "phone.png"))
    finally:
        browser.set_window_size(1100, 900)
