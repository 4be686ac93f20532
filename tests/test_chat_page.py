"""The chat page at ``/`` in a real browser: headless Chromium driven by Selenium, speaking
to a real server process on a loopback port, as a person would use it.

Needs selenium (``pip install -r requirements-browser.txt``) and Debian's ``chromium`` and
``chromium-driver`` packages; without them every test here is skipped and says why. The
plain-HTTP checks of the page (its headers, no key needed, nothing remote) are in
tests/test_server.py and run everywhere.
"""
from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from engine.serving.listening import serving_subprocess

from conftest import ROOT

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium: "
                                "pip install -r requirements-browser.txt")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="the browser tests need Chromium and its "
                                "driver: apt-get install chromium chromium-driver")

KEY = "page-key-456"
CAP = 100_000  # a greedy reply of this model never ends by itself: only Stop ends one this long
WAIT_S = 60  # the most any step may take before the test fails; a step usually takes far less
# Wraps fetch() to keep every request the page sends (URL, headers, parsed body), then passes it on.
RECORD_REQUESTS = """
window.sentRequests = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  window.sentRequests.push({url: String(url), headers: init.headers, body: JSON.parse(init.body)});
  return realFetch(url, init);
};
"""


@contextmanager
def page_server(model_dir: Path, log: Path, *flags: str) -> Iterator[str]:
    """A server for ``model_dir`` on a free loopback port; yields the page's URL."""
    command = [sys.executable, str(ROOT / "interface.py"), "serve", "--model-dir", str(model_dir), "--port", "0",
               "--max-tokens-cap", str(CAP), *flags]
    with serving_subprocess(command, log) as child:
        yield child.url.removesuffix("v1")
    assert "Traceback" not in log.read_text(), log.read_text()  # nothing the page did broke the server


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: Chromium's sandbox refuses to start as root, which test containers often are.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def open_url(trained_once, tmp_path_factory) -> Iterator[str]:
    with page_server(trained_once("bpe", 1), tmp_path_factory.mktemp("open") / "stderr.log") as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(trained_once, tmp_path_factory) -> Iterator[str]:
    with page_server(trained_once("bpe", 1), tmp_path_factory.mktemp("keyed") / "stderr.log",
                     "--api-key", KEY) as url:
        yield url


class ChatPage:
    """The page as a user works it: fields to fill, buttons to press, messages to read."""

    def __init__(self, driver, url: str) -> None:
        self.driver = driver
        driver.get(url)
        driver.execute_script(RECORD_REQUESTS)

    def element(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def wait(self, condition, what: str) -> None:
        WebDriverWait(self.driver, WAIT_S, poll_frequency=0.05).until(lambda _: condition(), message=what)

    def settings(self, system: str = "", temperature: str = "", max_tokens: str = "") -> None:
        self.element("settings").click()  # open the <details>
        for field, value in (("system", system), ("temperature", temperature), ("max-tokens", max_tokens)):
            self.element(field).clear()
            self.element(field).send_keys(value)

    def send(self, text: str) -> None:
        self.element("message").send_keys(text, Keys.ENTER)

    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of every message shown, top to bottom."""
        shown = self.driver.find_elements(By.CSS_SELECTOR, "#conversation .message")
        return [(m.get_attribute("class").split()[1], m.get_attribute("textContent")) for m in shown]

    def replying(self) -> bool:
        return self.element("stop").get_attribute("disabled") is None  # Stop is live only while a reply streams

    def wait_for_reply(self) -> None:
        self.wait(lambda: not self.replying() and self.element("send").is_enabled(), "the reply did not finish")

    def sent(self) -> list[dict]:
        return self.driver.execute_script("return window.sentRequests")

    def status(self) -> str:
        return self.element("status").text


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "health", timeout=10) as response:
        return json.loads(response.read())


def test_a_reply_streams_in_and_follow_ups_carry_the_conversation(browser, open_url):
    page = ChatPage(browser, open_url)
    page.settings(system="Be brief.", temperature="0", max_tokens="8")
    page.send("<b>Hello</b> & more")
    page.wait_for_reply()
    page.send("And then?")
    page.wait_for_reply()

    shown = page.messages()
    assert [role for role, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[0][1] == "<b>Hello</b> & more"  # text, not markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#conversation b")
    first_reply = shown[1][1]
    assert first_reply.strip() and shown[3][1].strip()
    second = page.sent()[1]
    assert second["body"]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<b>Hello</b> & more"},
        {"role": "assistant", "content": first_reply}, {"role": "user", "content": "And then?"}]
    assert second["body"]["temperature"] == 0 and second["body"]["max_tokens"] == 8
    assert second["body"]["stream"] is True and second["url"] == "v1/chat/completions"
    assert page.status() == "The reply stopped at the max tokens limit."

    page.element("clear").click()
    assert page.messages() == []
    page.send("Fresh start")
    page.wait_for_reply()
    assert [m["role"] for m in page.sent()[-1]["body"]["messages"]] == ["system", "user"]


def test_text_shows_while_it_streams_and_stop_ends_the_reply(browser, open_url):
    page = ChatPage(browser, open_url)
    page.settings(temperature="0", max_tokens=str(CAP))
    cancelled = health(open_url)["cancelled"]
    page.send("Tell me everything")
    # Text is on the page while the reply is still coming (Stop is live): it is shown as it arrives.
    page.wait(lambda: page.replying() and page.messages()[-1][1], "no text appeared while streaming")
    page.element("stop").click()
    page.wait_for_reply()
    (_, question), (_, partial) = page.messages()
    assert question == "Tell me everything" and partial
    reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    assert "stopped" in reply.get_attribute("class").split()
    page.wait(lambda: health(open_url)["cancelled"] > cancelled, "the server did not cancel the generation")
    # What arrived before Stop stays in the conversation for the next turn.
    page.settings(temperature="0", max_tokens="4")
    page.send("Go on")
    page.wait_for_reply()
    assert page.sent()[-1]["body"]["messages"][1] == {"role": "assistant", "content": partial}


def test_a_refused_request_is_one_line_and_the_message_comes_back(browser, open_url):
    page = ChatPage(browser, open_url)
    page.settings(max_tokens=str(CAP + 1))
    page.send("Too long please")
    page.wait(lambda: page.status(), "no error was shown")
    assert page.status() == f"max_tokens is {CAP + 1}; this server allows at most {CAP} (--max-tokens-cap)"
    assert "error" in page.element("status").get_attribute("class")
    assert page.messages() == [] and page.element("message").get_attribute("value") == "Too long please"


def test_the_page_asks_for_the_key_and_keeps_it_out_of_the_url(browser, keyed_url):
    page = ChatPage(browser, keyed_url)  # the page itself loads without the key
    page.settings(temperature="0", max_tokens="6")
    page.send("Hello")
    page.wait(lambda: page.element("key-form").is_displayed(), "the page did not ask for the key")
    assert page.element("key-reason").text == "This server needs an API key."
    page.element("api-key").send_keys("wrong", Keys.ENTER)
    page.wait(lambda: page.element("key-reason").text == "the API key is wrong", "a wrong key was not refused")
    page.element("api-key").send_keys(KEY, Keys.ENTER)
    page.wait_for_reply()

    assert not page.element("key-form").is_displayed()
    (_, question), (_, reply) = page.messages()
    assert question == "Hello" and reply.strip()
    requests = page.sent()
    assert [r["headers"].get("Authorization") for r in requests] == [None, "Bearer wrong", f"Bearer {KEY}"]
    assert all(KEY not in r["url"] for r in requests) and KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('custom-llm-api-key')") == KEY
    # The key lasts for the tab: a reloaded page answers without asking again.
    page = ChatPage(browser, keyed_url)
    page.send("Again")
    page.wait_for_reply()
    assert not page.element("key-form").is_displayed() and len(page.messages()) == 2
