"""The front door and the HTTP side, over raw sockets (contract parts B and C):
request heads of any size a browser sends, token lists, frames sent with an
upgrade, connection mode's process slots, the token and origin on /init and
/run, a timeout for every stage, aiohttp's lazy load, malformed requests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, IMAGE_ENV, TIME_FACTOR

from actionloop.config import Config
from actionloop.listener import Endpoints, listen
from actionloop.runtime import Runtime
from actionloop.websocket import Sockets

TIMEOUT = 20 * TIME_FACTOR
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Raw:
    """One client connection over a plain socket: bytes out, heads and frames in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.data = b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed; had {self.data[:200]!r}")
        self.data += chunk

    def take(self, size: int) -> bytes:
        while len(self.data) < size:
            self._fill()
        taken, self.data = self.data[:size], self.data[size:]
        return taken

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-cased names) and body of one HTTP response."""
        while b"\r\n\r\n" not in self.data:
            self._fill()
        head, self.data = self.data.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        body = self.take(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    def frame(self) -> tuple[int, bytes]:
        """Opcode and payload of one (unmasked, unfragmented) frame from the server."""
        first, second = self.take(2)
        size = second & 0x7F
        if size >= 126:
            size = int.from_bytes(self.take(2 if size == 126 else 8), "big")
        return first & 0x0F, self.take(size)

    def ask(self, message: Any) -> Any:
        """One text message out, its reply parsed."""
        self.send(text_frame(json.dumps(message)))
        opcode, payload = self.frame()
        assert opcode == 1, (opcode, payload)
        return json.loads(payload)

    def closed_within(self, seconds: float) -> bool:
        """True if the server closes the connection within `seconds` (bytes before are dropped)."""
        self.sock.settimeout(seconds * TIME_FACTOR)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True


def text_frame(text: str) -> bytes:
    """A masked text frame, as a client must send it (RFC 6455, 5.3)."""
    payload, mask = text.encode(), os.urandom(4)
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    return b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade_head(path: str = "/hello", connection: str = "Upgrade", extra: str = "", key: str = KEY) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: {connection}\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def ws_server(start_server: Any, **env: str) -> Any:
    return start_server({**IMAGE_ENV, "OW_WEBSOCKET": "/hello", "OW_AUTOINIT": str(EXAMPLES / "hello.py"), **env})


def cookies(total: int) -> str:
    """One Cookie line, as a browser sends it, of about `total` bytes."""
    count = total // 100
    return "Cookie: " + "; ".join(f"c{i}={'v' * 95}" for i in range(count)) + "\r\n"


# ---------------------------------------------------------------- head sizes


@pytest.mark.parametrize(
    "extra",
    [
        f"Cookie: a={'x' * 1500}\r\nCookie: b={'y' * 1500}\r\n",
        cookies(12_000),
        f"Cookie: a={'x' * 1500}\r\nX-Filler: {'f' * 20_000}\r\n",  # over picows' own 16 KiB, under ours
    ],
    ids=["two-1500-byte-cookies", "12-KB-of-cookies", "20-KB-header"],
)
def test_upgrade_with_long_head(start_server: Any, extra: str) -> None:
    """A browser's upgrade with many cookies is accepted and served (101, then a reply)."""
    server = ws_server(start_server)
    with Raw(server.port) as client:
        client.send(upgrade_head(extra=extra))
        assert client.response()[0] == 101
        assert client.ask({"name": "c"}) == {"greeting": "Hello, c!"}


def test_upgrade_with_long_token_in_url(start_server: Any) -> None:
    """A long ?token= in the URL (a JWT, say) passes the token check and the upgrade."""
    token = "t" * 3000
    server = ws_server(start_server, OW_WEBSOCKET_TOKEN=token)
    with Raw(server.port) as client:
        client.send(upgrade_head(path=f"/hello?token={token}", extra=cookies(4000)))
        assert client.response()[0] == 101
        assert client.ask({"name": "t"}) == {"greeting": "Hello, t!"}


@pytest.mark.parametrize("upgrade", [True, False], ids=["upgrade", "plain"])
def test_head_over_limit_is_431(start_server: Any, upgrade: bool) -> None:
    """A 100 KB head gets 431 with a JSON error and Connection: close, never silence."""
    server = ws_server(start_server)
    filler = f"X-Filler: {'f' * 100_000}\r\n"
    head = upgrade_head(extra=filler) if upgrade else f"GET /healthz HTTP/1.1\r\nHost: x\r\n{filler}\r\n".encode()
    with Raw(server.port) as client:
        client.send(head)
        status, headers, body = client.response()
        assert status == 431 and headers["connection"] == "close"
        assert "larger than 32768 bytes" in json.loads(body)["error"]
        assert client.closed_within(10)


def test_plain_request_with_long_cookie(start_server: Any) -> None:
    """Plain HTTP takes the same heads: a 12 KB Cookie line, first and on a kept-alive connection."""
    server = ws_server(start_server)
    request = f"GET /healthz HTTP/1.1\r\nHost: x\r\n{cookies(12_000)}\r\n".encode()
    with Raw(server.port) as client:
        client.send(request)
        assert client.response()[0] == 200
        client.send(request)
        assert client.response()[0] == 200


@pytest.mark.parametrize("count", [1, 100], ids=["one-frame", "100-KB-of-frames"])
def test_upgrade_after_a_request_keeps_the_frames_sent_with_it(start_server: Any, count: int) -> None:
    """An upgrade on a kept-alive connection, sent in one packet with frames: every frame is answered."""
    server = ws_server(start_server)
    names = [f"{i}{'n' * 1000 if count > 1 else ''}" for i in range(count)]
    with Raw(server.port) as client:
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.response()[0] == 200
        frames = b"".join(text_frame(json.dumps({"name": name})) for name in names)
        client.send(upgrade_head(connection="keep-alive, Upgrade") + frames)
        assert client.response()[0] == 101
        for name in names:
            opcode, payload = client.frame()
            assert opcode == 1 and json.loads(payload) == {"greeting": f"Hello, {name}!"}
        assert client.ask({"name": "q"}) == {"greeting": "Hello, q!"}


# --------------------------------------------------------------- token lists


@pytest.mark.parametrize(
    "connection",
    [
        "keep-alive, Upgrade",
        "upgrade",
        "Upgrade, keep-alive",
        "keep-alive,UPGRADE",
        "keep-alive\r\nConnection: Upgrade",
    ],
)
def test_connection_token_list(start_server: Any, connection: str) -> None:
    """`Connection: keep-alive, Upgrade` (a token list, any case, even split over lines) upgrades."""
    server = ws_server(start_server)
    with Raw(server.port) as client:
        client.send(upgrade_head(connection=connection))
        status, headers, _ = client.response()
        assert status == 101 and headers["upgrade"].lower() == "websocket"
        assert client.ask({"name": "k"}) == {"greeting": "Hello, k!"}


def test_connection_without_upgrade_is_400(start_server: Any) -> None:
    """Connection: keep-alive alone is not a handshake: 400 with a JSON error."""
    server = ws_server(start_server)
    with Raw(server.port) as client:
        client.send(upgrade_head(connection="keep-alive"))
        status, _, body = client.response()
        assert status == 400 and "WebSocket" in json.loads(body)["error"]


# ------------------------------------------------- connection mode's slots


BAD_HANDSHAKES = [
    upgrade_head(key="abc"),  # picows checked the key only after our rules had taken a slot
    upgrade_head(key="dGhlIHNhbXBsZSBub25j"),
    upgrade_head(connection="keep-alive"),
    upgrade_head(connection="close"),
    upgrade_head(key="%%%%%%%%%%%%%%%%%%%%%%%%"),
]


def test_refused_handshakes_hold_no_process(start_server: Any) -> None:
    """Connection mode: refused handshakes keep no process slot; the 503 at the cap still comes at the handshake."""
    server = ws_server(start_server, OW_PROCESS_MODE="connection", OW_MAX_PROCESSES="2")
    for head in BAD_HANDSHAKES:
        with Raw(server.port) as client:
            client.send(head)
            assert client.response()[0] == 400
    with Raw(server.port) as first, Raw(server.port) as second, Raw(server.port) as third:
        for client in (first, second):
            client.send(upgrade_head())
            assert client.response()[0] == 101
            assert client.ask({"name": "s"}) == {"greeting": "Hello, s!"}
        third.send(upgrade_head())
        status, _, body = third.response()
        assert status == 503 and "try again later" in json.loads(body)["error"]


def test_picows_refusal_after_ours_holds_no_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A handshake our rules pass but picows refuses (a bad key, our key check off) takes no process slot."""
    from actionloop import handshake

    monkeypatch.setattr(handshake, "key_valid", lambda key: True)
    asyncio.run(refused_by_picows_only(tmp_path))


async def refused_by_picows_only(tmp_path: Path) -> None:
    config = Config(
        websocket="/hello", mode="connection", max_processes=1, action_dir=tmp_path, host="127.0.0.1", port=0
    )
    runtime = Runtime(config)
    await runtime.autoinit(str(EXAMPLES / "hello.py"), "main")
    endpoints = Endpoints(runtime, Sockets())
    server = await listen(endpoints)
    port = server.sockets[0].getsockname()[1]
    try:
        for head in (upgrade_head(key="abc"), upgrade_head(key="abc"), upgrade_head()):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            status = await asyncio.wait_for(reader.readline(), TIMEOUT)
            writer.close()
            assert status.split()[1] == (b"101" if head == upgrade_head() else b"400"), status
    finally:
        server.close()
        await endpoints.close()
        await runtime.close()


# ---------------------------------------------------- /init and /run guarded


def http(server: Any, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection (Connection: close): status, headers, body."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    with Raw(server.port) as client:
        client.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return client.response()


RUN = json.dumps({"value": {"name": "r"}}).encode()
INIT = json.dumps({"value": {"code": "def main(a):\n    return a\n"}}).encode()


def test_token_guards_init_and_run(start_server: Any) -> None:
    """With OW_WEBSOCKET_TOKEN, /init and /run need it too (401 without, 403 wrong); health, metrics, demo stay open."""
    server = ws_server(start_server, OW_WEBSOCKET_TOKEN="s3cret", OW_DEMO="1", OW_DEBUG="1")
    for path, body in (("/run", RUN), ("/init", INIT)):
        status, headers, reply = http(server, "POST", path, body, Content_Type="text/plain")
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "token" in json.loads(reply)["error"]
        assert http(server, "POST", path, body, Authorization="Bearer wrong")[0] == 403
        assert http(server, "POST", path + "?token=wrong", body)[0] == 403
    status, _, reply = http(server, "POST", "/run", RUN, Authorization="Bearer s3cret")
    assert status == 200 and json.loads(reply) == {"greeting": "Hello, r!"}
    assert http(server, "POST", "/run?token=s3cret", RUN)[0] == 200
    assert http(server, "POST", "/init", INIT, Authorization="Bearer s3cret")[0] == 200
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        assert http(server, "GET", path)[0] == 200, path


def test_origin_guards_init_and_run(start_server: Any) -> None:
    """With OW_WEBSOCKET_ORIGIN, a cross-site POST (text/plain: no preflight) is 403; no Origin is not a browser."""
    server = ws_server(start_server, OW_WEBSOCKET_ORIGIN="app.example.com")
    for path, body in (("/run", RUN), ("/init", INIT)):
        status, _, reply = http(server, "POST", path, body, Content_Type="text/plain", Origin="https://evil.example")
        assert status == 403 and "origin" in json.loads(reply)["error"]
        assert http(server, "POST", path, body, Origin="null")[0] == 403
    assert http(server, "POST", "/run", RUN, Origin="https://app.example.com")[0] == 200
    assert http(server, "POST", "/run", RUN)[0] == 200
    assert http(server, "GET", "/healthz", Origin="https://evil.example")[0] == 200


# ------------------------------------------------------------------- timeouts


def test_head_timeout(start_server: Any) -> None:
    """A first request head not done within OW_HEAD_TIMEOUT: the connection is closed."""
    server = ws_server(start_server, OW_HEAD_TIMEOUT="1")
    with Raw(server.port) as silent, Raw(server.port) as slow:
        slow.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert silent.closed_within(5) and slow.closed_within(5)


def test_keepalive_timeout(start_server: Any) -> None:
    """A kept-alive connection idle, or slow with its next head, for OW_KEEPALIVE_TIMEOUT is closed."""
    server = ws_server(start_server, OW_KEEPALIVE_TIMEOUT="1")
    with Raw(server.port) as idle, Raw(server.port) as slow:
        for client in (idle, slow):
            client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.response()[0] == 200
        slow.send(b"GET /healthz HTTP/1.1\r\n")
        assert idle.closed_within(5) and slow.closed_within(5)


def test_body_timeout(start_server: Any) -> None:
    """A /run body that stalls for OW_BODY_TIMEOUT gets 408 and a close; a slow but steady one is served."""
    server = ws_server(start_server, OW_BODY_TIMEOUT="1")
    head = f"POST /run HTTP/1.1\r\nHost: x\r\nContent-Length: {len(RUN)}\r\n\r\n".encode()
    with Raw(server.port) as stalled, Raw(server.port) as steady:
        stalled.send(head + RUN[:5])
        steady.send(head)
        for i in range(0, len(RUN), 4):  # over 2 s in all, never 1 s without a byte
            time.sleep(0.4)
            steady.send(RUN[i : i + 4])
        status, headers, body = stalled.response()
        assert status == 408 and headers["connection"] == "close" and "body" in json.loads(body)["error"]
        assert stalled.closed_within(10)  # after up to 5 s of reading what may still come
        status, _, body = steady.response()
        assert status == 200 and json.loads(body) == {"greeting": "Hello, r!"}


# -------------------------------------------------------------- lazy aiohttp

FAIL_ONCE = """
import os, sys

class FailOnce:
    \"\"\"The first import of aiohttp fails, as it would with no descriptors left.\"\"\"

    def find_spec(self, name, path=None, target=None):
        marker = os.environ["FAIL_ONCE_MARKER"]
        if name == "aiohttp" and not os.path.exists(marker):
            open(marker, "w").close()
            raise OSError(24, "Too many open files")
        return None

sys.meta_path.insert(0, FailOnce())
"""


def test_http_side_loads_after_a_failed_first_try(start_server: Any, tmp_path: Path) -> None:
    """aiohttp's first import failing (descriptors exhausted) is not cached: the next connection loads it."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAIL_ONCE)
    marker = tmp_path / "failed"
    server = ws_server(start_server, PYTHONPATH=str(tmp_path / "site"), FAIL_ONCE_MARKER=str(marker))
    status, _, body = http(server, "GET", "/healthz")
    assert marker.exists() and status == 503 and "try again" in json.loads(body)["error"]
    for path in ("/healthz", "/metrics"):
        assert http(server, "GET", path)[0] == 200
    assert http(server, "POST", "/run", RUN)[0] == 200
    assert server.err().count("Too many open files") == 1


# ------------------------------------------------------- malformed requests

MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS spoken to a plain port
    b"GET /hello HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nNo colon\r\n\r\n",
]


@pytest.mark.parametrize("later", [False, True], ids=["first-request", "after-a-request"])
def test_malformed_requests_log_one_line(start_server: Any, later: bool) -> None:
    """Each malformed request gets 400 and at most one line on stderr, with no traceback."""
    server = ws_server(start_server)
    before = server.err().count("\n")
    for request in MALFORMED:
        with Raw(server.port) as client:
            if later:
                client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.response()[0] == 200
            client.send(request)
            assert client.response()[0] == 400, request
    time.sleep(0.2 * TIME_FACTOR)  # the log is written after the reply
    log = server.err()
    assert "Traceback" not in log and log.count("\n") - before <= len(MALFORMED), log
