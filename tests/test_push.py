"""Push, channels and the management API on one replica (contract part D).

A real server with OW_API_TOKEN, real WebSocket clients (the `websockets`
library, or a raw socket for a client that never reads) and plain HTTP to
the API's own port: every route, its refusals (401, 403, 410, 400), that
the public port never serves it, and actions that push through
`actionloop_api` from a background thread or subscribe their own
connection. test_replicas.py does the same across replicas over Redis.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IMAGE_ENV, TIME_FACTOR, Server, free_port
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from actionloop import api_client

TIMEOUT = 10 * TIME_FACTOR
TOKEN = "push-test-token"
# The server's wait for a client to answer its Close (websocket.CLOSE_WAIT).
CLOSE_WAIT = 5.0

# One action for every test: by default it says who it is and what it sees;
# `tick` starts a thread that pushes later, `join` subscribes its own
# connection to a room and publishes there.
ACTION = """
import os, threading, time
import actionloop_api

def tick(me, count):
    for n in range(count):
        time.sleep(0.02)
        actionloop_api.send(me, {"tick": n})

def main(args):
    me = os.environ["__OW_CONNECTION_ID"]
    if args.get("do") == "tick":
        threading.Thread(target=tick, args=(me, args["count"]), daemon=True).start()
        return {"ticking": args["count"]}
    if args.get("do") == "join":
        joined = actionloop_api.subscribe(me, args["room"])
        actionloop_api.publish(args["room"], {"joined": me})
        return {"joined": joined}
    if args.get("do") == "send_without_api":
        try:
            actionloop_api.send(me, 1)
        except actionloop_api.APIError as exc:
            return {"refused": str(exc)}
        return {"refused": None}
    return {
        "id": me,
        "url": os.environ.get("__OW_API_URL"),
        "token": os.environ.get("__OW_API_TOKEN"),
    }
"""


class API:
    """The management API of one server, over plain HTTP on its own port."""

    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.port = port
        self.token = token

    def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, token: str | None = ""
    ) -> tuple[int, Any]:
        """One request: (status, the JSON answer); token "" means this API's own, None none at all."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        bearer = self.token if token == "" else token
        if bearer is not None:
            request.add_header("Authorization", f"Bearer {bearer}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text.decode(errors="replace")

    def wait_ready(self) -> API:
        """Until the API's port accepts (it starts after the public port)."""
        until(lambda: accepts(self.port), "the management API did not start listening")
        return self


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def until(check: Callable[[], Any], why: str, timeout: float = TIMEOUT, every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; that value, or fail with `why`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(why)
        time.sleep(every)


def pushing(start_server: Any, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[Server, API]:
    """A server of ACTION with the management API on a free port."""
    action = tmp_path / "push_action.py"
    if not action.exists():
        action.write_text(ACTION)
    port = free_port()
    settings = {
        **IMAGE_ENV,
        "OW_WEBSOCKET": "/ws",
        "OW_AUTOINIT": str(action),
        "OW_API_TOKEN": TOKEN,
        "OW_API_PORT": str(port),
        **(env or {}),
    }
    server = start_server(settings)
    return server, API(port).wait_ready()


@contextlib.contextmanager
def client(server: Server) -> Iterator[tuple[ClientConnection, str]]:
    """A WebSocket client of ACTION, and the id of its connection (asked of the action)."""
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
        ws.send("{}")
        yield ws, json.loads(ws.recv(timeout=TIMEOUT))["id"]


def receive(ws: ClientConnection, timeout: float = TIMEOUT) -> Any:
    return json.loads(ws.recv(timeout=timeout))


def nothing_more(ws: ClientConnection, wait: float = 0.3 * TIME_FACTOR) -> None:
    """Nothing arrives on `ws` for `wait` seconds."""
    with pytest.raises(TimeoutError):
        extra = ws.recv(timeout=wait)
        raise AssertionError(f"unexpected message: {extra!r}")


def test_every_route_with_a_real_client(start_server: Any, tmp_path: Path) -> None:
    """send, describe, subscribe, publish, unsubscribe, broadcast and close reach a real WebSocket client."""
    server, api = pushing(start_server, tmp_path)
    with client(server) as (ws, me), client(server) as (other, them):
        assert api.call("POST", f"/connections/{me}", {"hello": ["you", 1]}) == (200, {"sent": True})
        assert receive(ws) == {"hello": ["you", 1]}
        nothing_more(other, 0.1)

        status, found = api.call("GET", f"/connections/{me}")
        assert status == 200, found
        assert found["id"] == me and found["channels"] == []
        assert me.startswith(found["replica"] + "-")
        assert abs(found["connected_at"] - time.time()) < 30 and found["last_active_at"] >= found["connected_at"]

        assert api.call("PUT", f"/connections/{me}/channels/news") == (200, {"subscribed": True})
        assert api.call("GET", f"/connections/{me}")[1]["channels"] == ["news"]
        assert api.call("POST", "/channels/news", {"headline": 1}) == (200, {"published": True})
        assert receive(ws) == {"headline": 1}
        nothing_more(other, 0.1)

        assert api.call("DELETE", f"/connections/{me}/channels/news") == (200, {"unsubscribed": True})
        assert api.call("GET", f"/connections/{me}")[1]["channels"] == []
        assert api.call("POST", "/channels/news", {"headline": 2}) == (200, {"published": True})
        nothing_more(ws, 0.2)

        assert api.call("POST", "/broadcast", "everyone") == (200, {"broadcast": True})
        assert receive(ws) == "everyone" and receive(other) == "everyone"

        # Replies keep working beside pushes.
        ws.send('{"do": "none"}')
        assert receive(ws)["id"] == me

        assert api.call("DELETE", f"/connections/{me}") == (200, {"closed": True})
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
        assert ws.close_code == 1000, ws.close_reason
        # Gone for every route once the connection has ended.
        until(lambda: api.call("GET", f"/connections/{me}")[0] == 410, "a closed connection is still described")
        assert api.call("POST", f"/connections/{me}", 1)[0] == 410
        assert api.call("PUT", f"/connections/{me}/channels/news")[0] == 410
        # The other one never heard any of it.
        nothing_more(other, 0.1)
        assert api.call("GET", f"/connections/{them}")[0] == 200


ROUTES = [
    ("POST", "/connections/{id}", 1),
    ("GET", "/connections/{id}", None),
    ("DELETE", "/connections/{id}", None),
    ("PUT", "/connections/{id}/channels/c", None),
    ("DELETE", "/connections/{id}/channels/c", None),
    ("POST", "/channels/c", 1),
    ("POST", "/broadcast", 1),
]


def test_refusals(start_server: Any, tmp_path: Path) -> None:
    """401 without the token, 403 with a wrong one, 410 for unknown ids, 400 for a body that is not JSON."""
    server, api = pushing(start_server, tmp_path)
    with client(server) as (ws, me):
        for method, path, body in ROUTES:
            target = path.format(id=me)
            status, answer = api.call(method, target, body, token=None)
            assert status == 401 and "error" in answer, (method, path, status, answer)
            status, answer = api.call(method, target, body, token="not-" + TOKEN)
            assert status == 403 and "error" in answer, (method, path, status, answer)
            status, answer = api.call(method, target, body, token=TOKEN + "x")
            assert status == 403, (method, path, status, answer)
        for method, path, body in ROUTES[:5]:
            status, answer = api.call(method, path.format(id="nobody-abc123-7"), body)
            assert status == 410 and "gone" in answer["error"], (method, path, status, answer)
        for path in (f"/connections/{me}", "/channels/c", "/broadcast"):
            status, answer = api.call("POST", path, raw=b"{not json")
            assert status == 400 and "not valid JSON" in answer["error"], (path, status, answer)
        nothing_more(ws)  # none of it reached the connection
        assert api.call("GET", f"/connections/{me}")[0] == 200


def test_not_served_on_the_public_port(start_server: Any, tmp_path: Path) -> None:
    """The public port answers no API route, token or not, and nothing reaches the connection."""
    server, api = pushing(start_server, tmp_path)
    public = API(server.port)
    with client(server) as (ws, me):
        for method, path, body in ROUTES:
            for token in (TOKEN, None):
                status, answer = public.call(method, path.format(id=me), body, token=token)
                assert status >= 400 and status != 410, (method, path, status, answer)
                assert not isinstance(answer, dict) or not answer.get("sent"), answer
        nothing_more(ws)
        assert api.call("GET", f"/connections/{me}")[1]["channels"] == []


def test_action_pushes_from_a_background_thread(start_server: Any, tmp_path: Path) -> None:
    """An action's thread pushes 5 messages through actionloop_api after the reply; then the connection goes on."""
    server, _ = pushing(start_server, tmp_path)
    with client(server) as (ws, _):
        ws.send(json.dumps({"do": "tick", "count": 5}))
        got = [receive(ws) for _ in range(6)]
        assert got[0] == {"ticking": 5}, got  # the thread waits before its first push
        assert got[1:] == [{"tick": n} for n in range(5)]
        nothing_more(ws)
        ws.send("{}")
        assert "id" in receive(ws)


def test_action_subscribes_its_own_connection(start_server: Any, tmp_path: Path) -> None:
    """An action subscribes its connection to a room and publishes: every member hears each join once."""
    server, api = pushing(start_server, tmp_path)
    with client(server) as (first, one), client(server) as (second, two), client(server) as (outsider, _):
        first.send(json.dumps({"do": "join", "room": "lobby"}))
        got = [receive(first), receive(first)]  # the publish may come before the reply or after
        assert sorted(got, key=json.dumps) == sorted([{"joined": True}, {"joined": one}], key=json.dumps)
        second.send(json.dumps({"do": "join", "room": "lobby"}))
        got = [receive(second), receive(second)]
        assert sorted(got, key=json.dumps) == sorted([{"joined": True}, {"joined": two}], key=json.dumps)
        assert receive(first) == {"joined": two}
        nothing_more(first)
        nothing_more(outsider, 0.1)
        assert api.call("GET", f"/connections/{two}")[1]["channels"] == ["lobby"]


def test_action_sees_the_api(start_server: Any, tmp_path: Path) -> None:
    """Each activation sees __OW_CONNECTION_ID, __OW_API_URL (loopback, OW_API_PORT) and __OW_API_TOKEN."""
    server, api = pushing(start_server, tmp_path)
    with client(server) as (ws, me):
        ws.send("{}")
        seen = receive(ws)
    assert seen == {"id": me, "url": f"http://127.0.0.1:{api.port}", "token": TOKEN}


def test_no_token_no_api(start_server: Any, tmp_path: Path) -> None:
    """Without OW_API_TOKEN nothing listens on OW_API_PORT and the action sees no API."""
    action = tmp_path / "push_action.py"
    action.write_text(ACTION)
    port = free_port()
    env = {**IMAGE_ENV, "OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(action), "OW_API_PORT": str(port)}
    server = start_server(env)
    with client(server) as (ws, me):
        ws.send("{}")
        assert receive(ws) == {"id": me, "url": None, "token": None}
        ws.send('{"do": "send_without_api"}')
        assert "no management API" in receive(ws)["refused"]
    assert not accepts(port)


def test_api_client_answers(start_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """actionloop_api: True, False or None for what is gone; APIError with the status, or 0 when nothing answers."""
    server, api = pushing(start_server, tmp_path)
    monkeypatch.setenv("__OW_API_URL", f"http://127.0.0.1:{api.port}")
    monkeypatch.setenv("__OW_API_TOKEN", TOKEN)
    with client(server) as (ws, me):
        assert api_client.send(me, {"from": "api_client"}) is True
        assert receive(ws) == {"from": "api_client"}
        assert api_client.subscribe(me, "a/b c%") is True
        assert api_client.describe(me)["channels"] == ["a/b c%"]  # type: ignore[index]
        api_client.publish("a/b c%", 1)
        api_client.broadcast(2)
        assert [receive(ws), receive(ws)] == [1, 2]
        assert api_client.unsubscribe(me, "a/b c%") is True
        assert api_client.send("nobody-abc123-7", 1) is False
        assert api_client.describe("nobody-abc123-7") is None
        assert api_client.close(me) is True
    monkeypatch.setenv("__OW_API_TOKEN", "wrong")
    with pytest.raises(api_client.APIError) as refused:
        api_client.broadcast(3)
    assert refused.value.status == 403
    monkeypatch.setenv("__OW_API_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(api_client.APIError) as unreachable:
        api_client.send(me, 1)
    assert unreachable.value.status == 0 and "cannot be reached" in str(unreachable.value)


# A client that never reads: a raw socket with a small receive buffer.
def silent_client(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def drain(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends up to its Close frame, or until it ends the connection (or `timeout`)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ends_with_close(data):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 20)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def ends_with_close(data: bytes | bytearray, code: int | None = None) -> bool:
    """Whether the stream's last frame is a Close (with `code`), found from the end whatever came before."""
    for start in range(len(data) - 4, max(len(data) - 130, -1), -1):
        if data[start] == 0x88 and data[start + 1] == len(data) - start - 2:
            return code is None or int.from_bytes(data[start + 2 : start + 4], "big") == code
    return False


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """The whole stream as (first byte, payload) frames, as a server sends them (unmasked)."""
    found = []
    at = 0
    while at + 2 <= len(data):
        length, start = data[at + 1] & 0x7F, at + 2
        if length == 126:
            length, start = int.from_bytes(data[at + 2 : at + 4], "big"), at + 4
        elif length == 127:
            length, start = int.from_bytes(data[at + 2 : at + 10], "big"), at + 10
        found.append((data[at], data[start : start + length]))
        at = start + length
    assert at == len(data), f"the stream does not end where a frame does ({at} != {len(data)})"
    return found


def silent_id(server: Server) -> str:
    """The id of the connection silent_client just opened (from its open event)."""
    lines = until(lambda: [line for line in server.err().splitlines() if "websocket_open" in line], "no open event")
    return str(json.loads(lines[-1])["connection"])


def rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_is_closed(start_server: Any, tmp_path: Path) -> None:
    """Pushes pile up behind a client that reads nothing: past 4 MiB it is closed with 1008 and leaves the hub."""
    server, api = pushing(start_server, tmp_path)
    with silent_client(server.port) as sock:
        me = silent_id(server)
        statuses = [api.call("POST", f"/connections/{me}", "x" * (1 << 20))[0] for _ in range(16)]
        assert set(statuses) <= {200, 410}, statuses
        # Once the client reads (within CLOSE_WAIT): what was sent before, then the Close (1008).
        data = drain(sock, CLOSE_WAIT)
        assert 4 << 20 < len(data) < 17 << 20, len(data)
        assert ends_with_close(data, 1008), data[-64:]
    until(lambda: api.call("GET", f"/connections/{me}")[0] == 410, "the closed connection is still in the hub")
    assert '"code":1008' in server.err()


def test_memory_stays_bounded_for_a_client_that_never_reads(start_server: Any, tmp_path: Path) -> None:
    """96 MiB pushed at a client that reads nothing: the server's resident memory grows by less than 32 MiB."""
    server, api = pushing(start_server, tmp_path)
    with silent_client(server.port):
        me = silent_id(server)
        blob = "x" * (1 << 20)
        before = rss(server.process.pid)
        statuses = [api.call("POST", f"/connections/{me}", blob)[0] for _ in range(96)]
        after = rss(server.process.pid)
        print(f"RSS {before >> 20} -> {after >> 20} MiB after 96 MiB pushed")  # pytest -s shows it
        assert set(statuses) <= {200, 410}, statuses
        assert after - before < 32 << 20, (before, after)


def test_backed_up_client_gets_every_push_intact(start_server: Any, tmp_path: Path) -> None:
    """Pushes of different sizes pile up behind a client that is not reading: once it reads, each is intact, in order."""
    server, api = pushing(start_server, tmp_path)
    with silent_client(server.port) as sock:
        me = silent_id(server)
        # About 7 MB in 40 messages, quickly: more than the kernel's buffers hold (4 MiB at most here),
        # so some wait in the server; if over 4 MiB of them do, it closes with 1008 and sends no more.
        sizes = [100_000, 300_000, 9_000, 500_000, 100] * 8
        statuses = [
            api.call("POST", f"/connections/{me}", {"n": n, "pad": "x" * size})[0] for n, size in enumerate(sizes)
        ]
        sent = statuses.count(200)
        # 200 while it was taken; once the server gave up on the client (1008), 410: never a 200 for a dropped one.
        assert statuses == [200] * sent + [410] * (len(sizes) - sent), statuses
        api.call("DELETE", f"/connections/{me}")
        got = frames(drain(sock, CLOSE_WAIT + TIMEOUT))
    kind, payload = got.pop()
    assert kind == 0x88 and int.from_bytes(payload[:2], "big") in (1000, 1008), (kind, payload[:64])
    assert len(got) > 10, len(got)
    assert len(got) == sent, (len(got), sent)  # each one answered 200 arrived
    assert [(kind, json.loads(payload)["n"]) for kind, payload in got] == [(0x81, n) for n in range(len(got))]


def test_client_that_never_reads_is_let_go(start_server: Any, tmp_path: Path) -> None:
    """A client closed with 1008 that still reads nothing is cut CLOSE_WAIT seconds later: it leaves the hub."""
    server, api = pushing(start_server, tmp_path)
    with silent_client(server.port):
        me = silent_id(server)
        for _ in range(8):
            api.call("POST", f"/connections/{me}", "x" * (1 << 20))
        assert api.call("GET", f"/connections/{me}")[0] == 410  # gone for the API once closed
        until(
            lambda: '"event":"websocket_close"' in server.err(),
            "a client that never reads is still connected",
            timeout=CLOSE_WAIT + 3 * TIME_FACTOR,
            every=0.5,
        )
        assert '"code":1008' in server.err()


def test_api_errors_are_json_and_channel_names_are_checked(start_server: Any, tmp_path: Path) -> None:
    """An unknown path or method answers JSON; a channel name too long or with control characters is 400."""
    server, api = pushing(start_server, tmp_path)
    status, body = api.call("GET", "/nowhere")
    assert status == 404 and "error" in body, body
    status, body = api.call("PATCH", "/broadcast", {})
    assert status == 405 and "error" in body, body
    with client(server) as (_, me):
        assert api.call("PUT", f"/connections/{me}/channels/{'c' * 300}")[0] == 400
        assert api.call("PUT", f"/connections/{me}/channels/a%0Db")[0] == 400
        assert api.call("POST", "/channels/a%00b", {})[0] == 400
        assert api.call("PUT", f"/connections/{me}/channels/{'c' * 256}")[0] == 200


def test_channels_per_connection_are_capped(start_server: Any, tmp_path: Path) -> None:
    """A connection joins 1,000 channels at most; the next subscribe is a 400 that says so."""
    server, api = pushing(start_server, tmp_path)
    with client(server) as (_, me):
        for n in range(1000):
            assert api.call("PUT", f"/connections/{me}/channels/c{n}")[0] == 200
        status, body = api.call("PUT", f"/connections/{me}/channels/one-more")
        assert status == 400 and "1000 channels" in body["error"], body
        assert api.call("PUT", f"/connections/{me}/channels/c0")[0] == 200  # already in it: fine
