"""Start the real `actionloop` command as a subprocess, like a fresh container.

Each server gets its own working folder, a free loopback port and files for
its stdout and stderr, so a test can check the streams the way OpenWhisk's
`checkStreams` does. Every server is stopped (SIGTERM, then SIGKILL) and
reaped at the end of its test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
# One knob for slow machines: every wait in the tests scales with it.
TIME_FACTOR = float(os.environ.get("ACTIONLOOP_TEST_TIME_FACTOR", "1"))
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ACTIONLOOP = str(Path(sys.executable).parent / "actionloop")

# The environment the official OpenWhisk Python runtime image sets.
IMAGE_ENV = {"OW_WAIT_FOR_ACK": "1", "OW_LOG_INIT_ERROR": "1", "OW_EXECUTION_ENV": "openwhisk/action-python-v3.11"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OW_", "__OW_"))}
    # No load balancer in front of a test's server: nothing to wait for after
    # SIGTERM (README: Shutdown). Tests of the delay set it themselves.
    env["OW_DRAIN_DELAY"] = "0"
    env.update(extra or {})
    return env


class Server:
    """One running `actionloop` process and a small HTTP client for it."""

    def __init__(self, folder: Path, env: dict[str, str], args: list[str]) -> None:
        self.folder = folder
        self.port = free_port()
        self.out_path = folder / "stdout.txt"
        self.err_path = folder / "stderr.txt"
        self.process = subprocess.Popen(
            [ACTIONLOOP, "--port", str(self.port), "--host", "127.0.0.1", *args],
            cwd=folder,
            env=clean_env(env),
            stdin=subprocess.DEVNULL,
            stdout=open(self.out_path, "wb"),  # noqa: SIM115 - the child owns it
            stderr=open(self.err_path, "wb"),  # noqa: SIM115
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 10.0) -> Server:
        """Until the port accepts; fails with the server's stderr if it exits."""
        deadline = time.monotonic() + timeout * TIME_FACTOR
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}: {self.err()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError("server did not start listening")

    def post(self, path: str, body: bytes | dict[str, Any] | list[Any]) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30 * TIME_FACTOR) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text.decode()

    def init(
        self, code: str, main: str = "main", binary: bool = False, env: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        value: dict[str, Any] = {"code": code, "main": main, "binary": binary}
        if env is not None:
            value["env"] = env
        return self.post("/init", {"value": value})

    def run(self, value: Any, **extra: Any) -> tuple[int, Any]:
        return self.post("/run", {"value": value, **extra})

    def stop(self) -> int:
        """SIGTERM, wait, SIGKILL if needed; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10 * TIME_FACTOR)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # nothing of the server's may outlive it
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.process.returncode

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def streams(self) -> tuple[str, str]:
        """Stop the server and return (stdout, stderr), as the OpenWhisk suite does."""
        self.stop()
        return self.out(), self.err()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """start_server(env=None, args=(), ready=True) -> Server; all stopped after."""
    servers: list[Server] = []

    def start(env: dict[str, str] | None = None, args: list[str] | tuple[str, ...] = (), ready: bool = True) -> Server:
        folder = tmp_path / f"server{len(servers)}"
        folder.mkdir()
        server = Server(folder, env or {}, list(args))
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


def check_streams(out: str, err: str, *, sentinels: int = 1) -> tuple[str, str]:
    """OpenWhisk's checkStreams: count sentinels, return both streams without them."""
    assert out.count(SENTINEL) == sentinels, out
    assert err.count(SENTINEL) == sentinels, err

    def filtered(text: str) -> str:
        return "\n".join(line for line in text.splitlines() if line != SENTINEL).strip()

    return filtered(out), filtered(err)


def make_zip(files: dict[str, str | bytes], modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = ((modes or {}).get(name, 0o644) | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ask(ws: Any, message: Any) -> Any:
    """Send one WebSocket message (JSON-encoded unless a str) and parse the reply."""
    ws.send(message if isinstance(message, str) else json.dumps(message))
    return json.loads(ws.recv(timeout=20 * TIME_FACTOR))


def concurrently(count: int, client: Callable[[int], None]) -> None:
    """Run client(0..count-1) in threads at once; fail with the first failure."""
    failures: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            client(n)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60 * TIME_FACTOR)
    if failures:
        raise failures[0]
