"""Three real headless browsers behind one small interface, as ../shared/ENVIRONMENT.md starts them.

- Chromium: Playwright with the system /usr/bin/chromium (no `playwright install`).
- Firefox ESR: puppeteer-core over WebDriver BiDi, from Node (firefox.mjs here,
  `npm install` in this folder); the test talks to it one JSON line at a time.
- WebKit: MiniBrowser through WebKitWebDriver and Selenium, on a private X
  server from `xvfb-run -a` (WebKitGTK has no headless mode).

Every browser gets its own HOME and profile in the test's folder. Every
operation is bounded by the test's `Deadline`; `close()` reaps every process
the browser started, even when the driver itself is stuck.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, Protocol

import pytest
from conftest import TIME_FACTOR, free_port
from deploy_helpers import CHROMIUM_ARGS, REQUIRE_SYSTEM

HERE = Path(__file__).resolve().parent
MINIBROWSER = Path("/usr/lib/x86_64-linux-gnu/webkit2gtk-4.1/MiniBrowser")
# One step (a page load, a wait) never takes longer than this, nor past the deadline.
STEP = 20 * TIME_FACTOR


class Deadline:
    """The time one test has left; each step takes at most STEP of it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def step(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise AssertionError("the test ran out of time")
        return min(STEP, left)


@contextmanager
def time_limit(seconds: float) -> Iterator[Deadline]:
    """Steps end 10 s short of seconds (left for clean-up); SIGALRM at seconds fails whatever still hangs.

    Used inside the test, not as a fixture: the alarm is off before pytest writes its report.
    """

    def expire(signum: int, frame: FrameType | None) -> None:
        pytest.fail(f"the test took longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield Deadline(seconds - 10 * TIME_FACTOR)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Browser(Protocol):
    name: str
    version: str

    def goto(self, url: str) -> None: ...
    def run(self, js: str) -> Any: ...  # the value of a JavaScript expression
    def type(self, selector: str, text: str) -> None: ...  # key by key, as a user types
    def click(self, selector: str) -> None: ...
    def wait(self, js: str) -> None: ...  # until the expression is true
    def close(self) -> None: ...


def missing(reason: str) -> NoReturn:
    """Skip without the browser; fail instead where it must be there (.ci/run)."""
    if REQUIRE_SYSTEM:
        raise AssertionError(f"{reason} (ACTIONLOOP_REQUIRE_SYSTEM=1; scripts/test installs it)")
    pytest.skip(f"{reason}; scripts/test installs it")


def private_env(folder: Path) -> dict[str, str]:
    """Our environment with HOME and the XDG data folders in the test's own folder.

    Not TMPDIR: Chromium puts its singleton socket there, and a socket path
    under pytest's tmp_path is longer than the 108 bytes a socket path may take.
    """
    env = dict(os.environ)
    for var in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        path = folder / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    return env


def kill_group(process: subprocess.Popen[Any], *leaders: int) -> None:
    """SIGKILL the process group of a child started with start_new_session, and the groups led by leaders; reap."""
    for group in (process.pid, *leaders):
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait(10)


def pids_running_with(argument: str) -> list[int]:
    """The processes with this argument in their command line (a folder only this test uses)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # it ended while we looked
            pass
    return found


class Chromium:
    name = "chromium"

    def __init__(self, folder: Path, deadline: Deadline) -> None:
        chromium = shutil.which("chromium")
        if chromium is None:
            missing("chromium is not installed")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing("playwright is not installed")
        self.deadline = deadline
        env: dict[str, str | float | bool] = dict(private_env(folder))
        self.playwright = sync_playwright().start()
        try:
            self.context = self.playwright.chromium.launch_persistent_context(
                str(folder / "profile"),
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_ARGS,
                env=env,
                timeout=deadline.step() * 1000,
            )
        except BaseException:
            self.playwright.stop()
            raise
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.version = self.context.browser.version if self.context.browser else "?"

    def ms(self) -> float:
        return self.deadline.step() * 1000

    def goto(self, url: str) -> None:
        self.page.goto(url, timeout=self.ms())

    def run(self, js: str) -> Any:
        return self.page.evaluate(js)

    def type(self, selector: str, text: str) -> None:
        self.page.locator(selector).press_sequentially(text, timeout=self.ms())

    def click(self, selector: str) -> None:
        self.page.click(selector, timeout=self.ms())

    def wait(self, js: str) -> None:
        self.page.wait_for_function(js, timeout=self.ms(), polling=50)

    def close(self) -> None:
        try:
            self.context.close()
        finally:
            self.playwright.stop()


class Firefox:
    """Firefox ESR, driven by firefox.mjs (puppeteer-core) one JSON line at a time."""

    name = "firefox"

    def __init__(self, folder: Path, deadline: Deadline) -> None:
        firefox, node = shutil.which("firefox-esr"), shutil.which("node")
        if firefox is None or node is None:
            missing("firefox-esr and node are needed for Firefox")
        if not (HERE / "node_modules" / "puppeteer-core").is_dir():
            missing("puppeteer-core is not installed in tests/browsers (npm ci there)")
        self.deadline = deadline
        self.profile = str(folder / "profile")
        self.stderr = open(folder / "firefox.stderr", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [node, str(HERE / "firefox.mjs"), firefox, self.profile],
            cwd=HERE,
            env=private_env(folder),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            started = self._reply()
        except BaseException:
            self.close(gracefully=False)
            raise
        self.version = started["version"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def _reply(self) -> Any:
        try:
            line = self.lines.get(timeout=self.deadline.step())
        except queue.Empty:
            raise AssertionError("Firefox did not answer in time") from None
        if not line:
            raise AssertionError(f"the Firefox driver exited: {Path(self.stderr.name).read_text(errors='replace')}")
        message = json.loads(line)
        if "error" in message:
            raise AssertionError(f"Firefox: {message['error']}")
        return message["ok"]

    def _do(self, op: str, **args: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.process.stdin.flush()
        return self._reply()

    def goto(self, url: str) -> None:
        self._do("goto", url=url, timeout=self.deadline.step() * 1000)

    def run(self, js: str) -> Any:
        return self._do("eval", js=js)

    def type(self, selector: str, text: str) -> None:
        self._do("type", selector=selector, text=text)

    def click(self, selector: str) -> None:
        self._do("click", selector=selector)

    def wait(self, js: str) -> None:
        self._do("wait", js=js, timeout=self.deadline.step() * 1000)

    def close(self, gracefully: bool = True) -> None:
        try:
            if gracefully and self.process.poll() is None:
                self._do("close")
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(10)
        finally:
            # Puppeteer starts Firefox in a session of its own: find it by its profile,
            # even when it never got as far as telling us its pid.
            kill_group(self.process, *pids_running_with(self.profile))
            self.stderr.close()


class WebKit:
    """MiniBrowser (WebKitGTK) via WebKitWebDriver and Selenium, under xvfb-run."""

    name = "webkit"

    def __init__(self, folder: Path, deadline: Deadline) -> None:
        driver, xvfb_run = shutil.which("WebKitWebDriver"), shutil.which("xvfb-run")
        if driver is None or xvfb_run is None or not MINIBROWSER.exists():
            missing("WebKit needs WebKitWebDriver (webkit2gtk-driver), MiniBrowser and xvfb-run (xvfb)")
        try:
            from selenium import webdriver
            from selenium.webdriver.remote.client_config import ClientConfig
            from selenium.webdriver.remote.remote_connection import RemoteConnection
            from selenium.webdriver.webkitgtk.options import Options
        except ImportError:
            missing("selenium is not installed")
        self.deadline = deadline
        port = free_port()
        env = private_env(folder)
        # As root WebKit's bubblewrap sandbox cannot start (ENVIRONMENT.md).
        env["WEBKIT_DISABLE_SANDBOX_THIS_IS_DANGEROUS"] = "1"
        self.log = open(folder / "webkit.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [xvfb_run, "-a", "-s", "-nolisten tcp", driver, f"--port={port}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(port, deadline, self.process)
            options = Options()
            options.binary_location = str(MINIBROWSER)
            options.add_argument("--automation")
            config = ClientConfig(remote_server_addr=f"http://127.0.0.1:{port}", timeout=int(STEP))
            connection = RemoteConnection(client_config=config)
            self.driver = webdriver.Remote(command_executor=connection, options=options)
        except BaseException:
            self.close()
            raise
        self.version = str(self.driver.capabilities.get("browserVersion", "?"))

    def goto(self, url: str) -> None:
        self.driver.set_page_load_timeout(self.deadline.step())
        self.driver.get(url)

    def run(self, js: str) -> Any:
        self.driver.set_script_timeout(self.deadline.step())
        return self.driver.execute_script(f"return ({js});")

    def type(self, selector: str, text: str) -> None:
        self._element(selector).send_keys(text)

    def click(self, selector: str) -> None:
        self._element(selector).click()

    def wait(self, js: str) -> None:
        from selenium.webdriver.support.wait import WebDriverWait

        check: Callable[[Any], bool] = lambda driver: bool(driver.execute_script(f"return !!({js});"))  # noqa: E731
        WebDriverWait(self.driver, self.deadline.step(), poll_frequency=0.05).until(check, f"never true: {js}")

    def _element(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def close(self) -> None:
        try:
            if hasattr(self, "driver"):
                self.driver.quit()
        finally:
            kill_group(self.process)
            self.log.close()


def wait_for_port(port: int, deadline: Deadline, process: subprocess.Popen[Any]) -> None:
    end = time.monotonic() + deadline.step()
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"WebKitWebDriver exited {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("WebKitWebDriver did not start listening")


BROWSERS: dict[str, Callable[[Path, Deadline], Browser]] = {"chromium": Chromium, "firefox": Firefox, "webkit": WebKit}


@contextmanager
def launched(name: str, folder: Path, deadline: Deadline) -> Iterator[Browser]:
    """The named browser with its own HOME and profile under folder, closed after."""
    folder.mkdir(parents=True, exist_ok=True)
    browser = BROWSERS[name](folder, deadline)
    try:
        yield browser
    finally:
        # A time limit (SIGALRM) that strikes now waits until every process is gone.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            browser.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
