"""Auto-init from an http(s) URL, trusted only with OW_AUTOINIT_SHA256 (source.py).

A real runtime process fetches from a real HTTP server on loopback (and an
HTTPS one with a certificate made for the test), as a pod would from a bucket.
"""

from __future__ import annotations

import hashlib
import http.server
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ACTIONLOOP, EXAMPLES, TIME_FACTOR, ask, clean_env, free_port, make_zip
from websockets.sync.client import connect

TIMEOUT = 15 * TIME_FACTOR
HELLO = (EXAMPLES / "hello.py").read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Files(http.server.ThreadingHTTPServer):
    """Serves `answers[path]`: each request takes the next (status, body), the last repeats.

    A body of None is cut short: the head promises more than is sent.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers: dict[str, list[tuple[int, bytes | None]]] = {}
        self.requests: list[str] = []
        self.no_length: set[str] = set()  # these bodies end when the connection does

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.server_address[1]}{path}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Files

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        answers = self.server.answers.get(self.path, [(404, b"no such file")])
        status, body = answers.pop(0) if len(answers) > 1 else answers[0]
        self.send_response(status)
        if self.path not in self.server.no_length:
            self.send_header("Content-Length", str(len(body) if body is not None else 1000))
        self.end_headers()
        self.wfile.write(body if body is not None else b"only this")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_files(files: Files) -> Iterator[Files]:
    thread = threading.Thread(target=files.serve_forever, daemon=True)
    thread.start()
    yield files
    files.shutdown()
    files.server_close()


@pytest.fixture
def files() -> Iterator[Files]:
    yield from serve_files(Files())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1; the key is in the same folder."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")),
        ],
        check=True,
        capture_output=True,
    )
    return folder / "cert.pem"


@pytest.fixture
def tls_files(certificate: Path) -> Iterator[Files]:
    files = Files()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, certificate.with_name("key.pem"))
    files.socket = context.wrap_socket(files.socket, server_side=True)
    yield from serve_files(files)


def start(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    child = subprocess.Popen(
        [ACTIONLOOP, "--port", str(port), "--host", "127.0.0.1"],
        cwd=tmp_path,
        env=clean_env({"OW_WEBSOCKET": "/hello", "OW_WAIT_FOR_ACK": "1", **env}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    return child, port


def serving(child: subprocess.Popen[bytes], port: int) -> Iterator[Any]:
    """Connect once the server listens; fails with its log if it exits."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if child.poll() is not None:
            assert child.stderr is not None
            raise AssertionError(f"exited {child.returncode}: {child.stderr.read().decode()}")
        try:
            with connect(f"ws://127.0.0.1:{port}/hello", open_timeout=TIMEOUT) as ws:
                yield ws
            return
        except OSError:
            assert time.monotonic() < deadline, "never listened"
            time.sleep(0.05)


def stop(child: subprocess.Popen[bytes]) -> str:
    """SIGTERM; the log."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=TIMEOUT)
    return err.decode()


def fails(tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    """A runtime that must not start: its exit status and its log."""
    child, _ = start(tmp_path, env)
    try:
        _, err = child.communicate(timeout=TIMEOUT * 2)
    finally:
        child.kill()
    return child.returncode, err.decode()


def test_url_with_the_right_sha256_serves(tmp_path: Path, files: Files) -> None:
    """The code at the URL, with its sha256, is the action."""
    files.answers["/hello.py"] = [(200, HELLO)]
    child, port = start(tmp_path, {"OW_AUTOINIT": files.url("/hello.py"), "OW_AUTOINIT_SHA256": sha256(HELLO)})
    try:
        for ws in serving(child, port):
            assert ask(ws, {"name": "url"}) == {"greeting": "Hello, url!"}
    finally:
        stop(child)


def test_large_zip_beyond_a_config_map(tmp_path: Path, files: Files) -> None:
    """A 3 MiB zip (three times what a ConfigMap holds) loads from a URL."""
    import os

    filler = os.urandom(3 << 20)  # random: the zip cannot shrink it
    code = make_zip(
        {
            "__main__.py": "import os\ndef main(args):\n    return {'size': os.path.getsize('filler.bin')}\n",
            "filler.bin": filler,
        }
    )
    assert len(code) > 3 << 20
    files.answers["/big.zip"] = [(200, code)]
    child, port = start(tmp_path, {"OW_AUTOINIT": files.url("/big.zip"), "OW_AUTOINIT_SHA256": sha256(code).upper()})
    try:
        for ws in serving(child, port):
            assert ask(ws, {}) == {"size": 3 << 20}
    finally:
        stop(child)


def test_wrong_sha256_runs_nothing(tmp_path: Path, files: Files) -> None:
    """Bytes other than those pinned fail the start, loudly, and are never run."""
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').close()\ndef main(args):\n    return {{}}\n".encode()
    files.answers["/hello.py"] = [(200, evil)]
    status, log = fails(tmp_path, {"OW_AUTOINIT": files.url("/hello.py"), "OW_AUTOINIT_SHA256": sha256(HELLO)})
    assert status == 1
    line = next(line for line in log.splitlines() if "auto-init" in line)
    assert sha256(evil) in line and sha256(HELLO) in line and "not loaded" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"OW_AUTOINIT": "https://example.invalid/a.zip"}, "set OW_AUTOINIT_SHA256"),
        ({"OW_AUTOINIT": "http://example.invalid/a.zip", "OW_AUTOINIT_SHA256": "abc"}, "not a sha256"),
        ({"OW_AUTOINIT": "ftp://example.invalid/a.zip", "OW_AUTOINIT_SHA256": "0" * 64}, "https:// or http://"),
    ],
)
def test_url_settings_checked(tmp_path: Path, env: dict[str, str], says: str) -> None:
    """A URL without a valid sha256, or of another scheme, is a bad setting (exit 2), before any fetch."""
    status, log = fails(tmp_path, env)
    assert status == 2 and "bad setting" in log and says in log


def test_https_with_a_trusted_certificate(tmp_path: Path, tls_files: Files, certificate: Path) -> None:
    """https:// verifies the server with the system's trust, which SSL_CERT_FILE extends."""
    tls_files.answers["/hello.py"] = [(200, HELLO)]
    env = {"OW_AUTOINIT": tls_files.url("/hello.py", "https"), "OW_AUTOINIT_SHA256": sha256(HELLO)}
    child, port = start(tmp_path, {**env, "SSL_CERT_FILE": str(certificate)})
    try:
        for ws in serving(child, port):
            assert ask(ws, {"name": "tls"}) == {"greeting": "Hello, tls!"}
    finally:
        stop(child)


def test_https_with_an_untrusted_certificate_fails_at_once(tmp_path: Path, tls_files: Files) -> None:
    """A certificate that does not verify is not retried: the start fails and says why."""
    tls_files.answers["/hello.py"] = [(200, HELLO)]
    env = {"OW_AUTOINIT": tls_files.url("/hello.py", "https"), "OW_AUTOINIT_SHA256": sha256(HELLO)}
    status, log = fails(tmp_path, env)
    assert status == 1 and "CERTIFICATE_VERIFY_FAILED" in log and "again in" not in log


def test_passing_failures_are_retried(tmp_path: Path, files: Files) -> None:
    """A 503 and a body cut short are tried again; then the action loads."""
    files.answers["/hello.py"] = [(503, b"busy"), (200, None), (200, HELLO)]
    child, port = start(tmp_path, {"OW_AUTOINIT": files.url("/hello.py"), "OW_AUTOINIT_SHA256": sha256(HELLO)})
    try:
        for ws in serving(child, port):
            assert ask(ws, {"name": "again"}) == {"greeting": "Hello, again!"}
    finally:
        log = stop(child)
    assert files.requests == ["/hello.py"] * 3
    assert log.count("again in") == 2 and "HTTP 503" in log


def test_not_found_fails_without_retry(tmp_path: Path, files: Files) -> None:
    """A 404 is not passing: one request, exit 1, the status in the log."""
    status, log = fails(tmp_path, {"OW_AUTOINIT": files.url("/missing.zip"), "OW_AUTOINIT_SHA256": sha256(HELLO)})
    assert status == 1 and "HTTP 404" in log and files.requests == ["/missing.zip"]


@pytest.mark.parametrize("length", [True, False])
def test_download_bounded_by_max_archive(tmp_path: Path, files: Files, length: bool) -> None:
    """A body over OW_MAX_ARCHIVE is refused, not held, whether its length is announced or not."""
    files.answers["/hello.py"] = [(200, HELLO)]
    if not length:
        files.no_length.add("/hello.py")
    env = {"OW_AUTOINIT": files.url("/hello.py"), "OW_AUTOINIT_SHA256": sha256(HELLO), "OW_MAX_ARCHIVE": "100"}
    status, log = fails(tmp_path, env)
    assert status == 1 and "over OW_MAX_ARCHIVE" in log


def test_body_without_a_length(tmp_path: Path, files: Files) -> None:
    """A body that ends with its connection (no Content-Length) is read to its end."""
    files.answers["/hello.py"] = [(200, HELLO)]
    files.no_length.add("/hello.py")
    child, port = start(tmp_path, {"OW_AUTOINIT": files.url("/hello.py"), "OW_AUTOINIT_SHA256": sha256(HELLO)})
    try:
        for ws in serving(child, port):
            assert ask(ws, {"name": "stream"}) == {"greeting": "Hello, stream!"}
    finally:
        stop(child)


def test_file_checked_too(tmp_path: Path) -> None:
    """OW_AUTOINIT_SHA256 with a file checks the file."""
    status, log = fails(tmp_path, {"OW_AUTOINIT": str(EXAMPLES / "hello.py"), "OW_AUTOINIT_SHA256": "0" * 64})
    assert status == 1 and sha256(HELLO) in log


def test_url_is_not_polled_and_sighup_fetches_again(tmp_path: Path, files: Files) -> None:
    """No polling of a URL; SIGHUP fetches it again, and other bytes there are refused while the old code serves."""
    files.answers["/hello.py"] = [(200, HELLO)]
    env = {"OW_AUTOINIT": files.url("/hello.py"), "OW_AUTOINIT_SHA256": sha256(HELLO), "OW_AUTOINIT_POLL": "0.1"}
    child, port = start(tmp_path, env)
    try:
        for ws in serving(child, port):
            time.sleep(0.5)
            assert files.requests == ["/hello.py"]
            files.answers["/hello.py"] = [(200, b"def main(args):\n    return {'changed': True}\n")]
            child.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + TIMEOUT
            while len(files.requests) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.3)
            assert ask(ws, {"name": "still"}) == {"greeting": "Hello, still!"}
    finally:
        log = stop(child)
    assert "update from" in log and "not loaded" in log and "keeps serving" in log
