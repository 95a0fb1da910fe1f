"""The demo page in real headless Chromium, Firefox and WebKit, with KBs of cookies and the token.

From the issue: "The demo page is used in headless Chromium, Firefox and WebKit,
each with several KB of cookies on the server's origin and, where set, the
token subprotocol." A browser sends a site's cookies with every request to it,
the WebSocket handshake included, so a few long cookies make a handshake head
of several KB.

Each test starts the real server with the demo page, sets the cookies from a
page of the server's origin (document.cookie, as a site's own script would),
loads the page (with `?token=` when the server wants a token), types a name,
clicks Send and reads the reply shown on the page. test_handshake_heads shows
the same page, served by a raw-socket stand-in (browsers/recorder.py), and
checks and prints the head of every handshake each browser sends.

Browsers, drivers and their clean-up: browsers/drivers.py. The cookie cases
failed (onerror, 1006) before 2b9ff90, while a head over about 1,792 bytes got
no response.
"""

from __future__ import annotations

import base64
import json
import string
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from browsers.drivers import BROWSERS, Browser, launched, time_limit
from browsers.recorder import Head, Recorder
from conftest import EXAMPLES, TIME_FACTOR

# Each test, browser start and clean-up included, ends within this.
BUDGET = 60 * TIME_FACTOR
TOKEN = "demo-Token_42"
WS_PATH = "/hello"
STATUS = "document.getElementById('status').textContent"
REPLY = "document.getElementById('reply').textContent"
# Removes every cookie the page can see (all are set with path=/ here).
CLEAR_COOKIES = (
    "document.cookie.split('; ').filter(Boolean)"
    ".forEach(c => { document.cookie = c.split('=')[0] + '=; max-age=0; path=/'; })"
)


def cookie_values(count: int, size: int) -> tuple[tuple[str, str], ...]:
    """count cookies of size characters each, from the base64url alphabet (all valid in a cookie)."""
    alphabet = string.ascii_letters + string.digits + "-_"
    text = alphabet * (size // len(alphabet) + 2)
    return tuple((f"c{i}", text[i : i + size]) for i in range(count))


class Case(NamedTuple):
    id: str
    cookies: tuple[tuple[str, str], ...]
    token: bool

    @property
    def query(self) -> str:
        return f"/?token={TOKEN}" if self.token else "/"


CASES = [
    Case("plain", (), False),
    Case("two-1500", cookie_values(2, 1500), False),  # a head of about 3.5 KB
    Case("six-kb", cookie_values(6, 1000), False),  # about 6.5 KB
    Case("token", (), True),
    Case("token-six-kb", cookie_values(6, 1000), True),
]


def server_env(token: bool) -> dict[str, str]:
    env = {"OW_WEBSOCKET": WS_PATH, "OW_AUTOINIT": str(EXAMPLES / "hello.py"), "OW_DEMO": "1"}
    return env | ({"OW_WEBSOCKET_TOKEN": TOKEN} if token else {})


def put_cookies(browser: Browser, origin: str, cookies: tuple[tuple[str, str], ...]) -> None:
    """From a page of origin, replace its cookies with these; check the browser kept them all."""
    browser.goto(origin + "/")
    browser.run(CLEAR_COOKIES)
    for name, value in cookies:
        browser.run(f"document.cookie = {json.dumps(f'{name}={value}; path=/; SameSite=Lax')}")
    kept = set(filter(None, str(browser.run("document.cookie")).split("; ")))
    assert kept == {f"{name}={value}" for name, value in cookies}, f"{browser.name} did not keep the cookies"


def open_page(browser: Browser, url: str) -> str:
    """Load the demo page; its status line once it has connected or failed to."""
    browser.goto(url)
    browser.wait(f"!{STATUS}.startsWith('connecting')")
    return str(browser.run(STATUS))


def send(browser: Browser, name: str) -> Any:
    """Type a name, click Send, and read the reply the page shows."""
    browser.type("#name", name)
    browser.click("#send")
    browser.wait(f"{REPLY} !== ''")
    return json.loads(str(browser.run(REPLY)))


@pytest.mark.parametrize("browser_name", BROWSERS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_demo_page(browser_name: str, case: Case, start_server: Callable[..., Any], tmp_path: Path) -> None:
    """The page connects and shows the action's reply, with the case's cookies on the origin and token."""
    with time_limit(BUDGET) as deadline, launched(browser_name, tmp_path / browser_name, deadline) as browser:
        server = start_server(server_env(case.token))
        put_cookies(browser, server.url, case.cookies)
        status = open_page(browser, server.url + case.query)
        assert status == f"connected to {WS_PATH}", f"{browser.name}: {status}\nserver stderr:\n{server.err()[-3000:]}"
        name = f"{browser.name} {case.id}"
        assert send(browser, name) == {"greeting": f"Hello, {name}!"}


def check_head(head: Head, case: Case, origin: str) -> None:
    """A version-13 upgrade to the page's path, from the page's origin, with exactly its cookies and token."""
    assert head.request_line == f"GET {WS_PATH} HTTP/1.1"
    assert (head.get("Upgrade") or "").lower() == "websocket"
    assert "upgrade" in [token.strip().lower() for token in (head.get("Connection") or "").split(",")]
    assert head.get("Sec-WebSocket-Version") == "13"
    assert len(base64.b64decode(head.get("Sec-WebSocket-Key") or "")) == 16
    assert head.get("Origin") == origin
    assert head.get("Host") == origin.removeprefix("http://")
    sent = set(filter(None, (head.get("Cookie") or "").split("; ")))
    assert sent == {f"{name}={value}" for name, value in case.cookies}
    protocols = head.get("Sec-WebSocket-Protocol")
    assert protocols == (f"actionloop, bearer.{TOKEN}" if case.token else None)


def describe(head: Head) -> str:
    """The head's size, the headers that matter for the upgrade (cookies summed up), all names in order."""
    shown = [f"{len(head.raw) + 4} bytes"]  # + the blank line that ends the head
    for name, value in head.headers:
        if name.lower() == "cookie":
            shown.append(f"{name}: {len(value)} bytes in {value.count('; ') + 1} cookies")
        elif name.lower() in ("connection", "upgrade") or name.lower().startswith("sec-websocket-"):
            shown.append(f"{name}: {'(24 characters)' if name.lower() == 'sec-websocket-key' else value}")
    return " | ".join(shown) + "\n    order: " + ", ".join(name for name, _ in head.headers)


@pytest.mark.parametrize("browser_name", BROWSERS)
def test_handshake_heads(
    browser_name: str,
    start_server: Callable[..., Any],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Each browser's handshake: Upgrade, Connection, Sec-WebSocket-*, every cookie, the token subprotocol."""
    server = start_server(server_env(False))
    with urllib.request.urlopen(server.url + "/", timeout=10 * TIME_FACTOR) as response:
        page = response.read()
    recorder = Recorder(page, WS_PATH)
    seen: dict[str, str] = {}
    try:
        with time_limit(BUDGET) as deadline, launched(browser_name, tmp_path / browser_name, deadline) as browser:
            seen["browser"] = f"{browser.name} {browser.version}: {browser.run('navigator.userAgent')}"
            for case in CASES:
                put_cookies(browser, recorder.url, case.cookies)
                before = len(recorder.upgrades)
                assert open_page(browser, recorder.url + case.query) == f"connected to {WS_PATH}"
                heads = recorder.upgrades[before:]
                assert len(heads) == 1, f"{len(heads)} handshakes for one page load"
                check_head(heads[0], case, recorder.url)
                seen[case.id] = describe(heads[0])
    finally:
        recorder.stop()
    record_property("handshakes", seen)
    print("\n" + "\n".join(f"{key}: {value}" for key, value in seen.items()))
