"""WebSocket mode and auto-init (contract part B), with a real client.

The client is the `websockets` library, not our code; each test starts the
real `actionloop` command as a subprocess.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ACTIONLOOP,
    EXAMPLES,
    IMAGE_ENV,
    TIME_FACTOR,
    ask,
    b64,
    clean_env,
    concurrently,
    free_port,
    make_zip,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

TIMEOUT = 20 * TIME_FACTOR


def ws_server(start_server: Any, action: Path | str | None, path: str = "/hello", **env: str) -> Any:
    settings = {**IMAGE_ENV, "OW_WEBSOCKET": path, **env}
    if action is not None:
        settings["OW_AUTOINIT"] = str(action)
    return start_server(settings)


def test_hello(start_server: Any) -> None:
    """The example action answers over a WebSocket, and logs to stdout."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "Mike"}) == {"greeting": "Hello, Mike!"}
    assert "hello called with name='Mike'" in server.out()


def test_hundred_messages_in_order(start_server: Any) -> None:
    """100 messages on one connection come back in order (continuous mode)."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        for i in range(100):
            ws.send(json.dumps({"name": f"n{i}"}))
        replies = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in range(100)]
    assert replies == [{"greeting": f"Hello, n{i}!"} for i in range(100)]


def test_trailing_newline_and_unicode(start_server: Any) -> None:
    """Browsers' JSON.stringify(x)+"\\n" works; unicode passes both ways."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, json.dumps({"name": "Zoë ❄"}) + "\n") == {"greeting": "Hello, Zoë ❄!"}
        assert ask(ws, json.dumps({"name": "☃"}, ensure_ascii=True) + "\r\n") == {"greeting": "Hello, ☃!"}


@pytest.mark.parametrize(
    ("allowed", "origin", "accepted"),
    [
        ("hellows.example.com", "https://hellows.example.com", True),
        ("hellows.example.com", "http://hellows.example.com:8080", True),
        ("hellows.example.com", "https://evil.example.com", False),
        ("https://hellows.example.com", "https://hellows.example.com", True),
        ("https://hellows.example.com", "http://hellows.example.com", False),
        ("a.example.com,b.example.com", "https://b.example.com", True),
        ("hellows.example.com", None, True),
        ("hellows.example.com", "null", False),
    ],
)
def test_origin(start_server: Any, allowed: str, origin: str | None, accepted: bool) -> None:
    """OW_WEBSOCKET_ORIGIN is checked against Origin, whatever Host says."""
    server = ws_server(start_server, EXAMPLES / "hello.py", OW_WEBSOCKET_ORIGIN=allowed)
    try:
        with connect(server.ws_url("/hello"), origin=origin, open_timeout=TIMEOUT) as ws:  # type: ignore[arg-type]
            assert ask(ws, {"name": "o"}) == {"greeting": "Hello, o!"}
        assert accepted
    except InvalidStatus as exc:
        assert not accepted
        assert exc.response.status_code == 403


@pytest.mark.parametrize("host", ["evil.example.com", "hellows.example.com"])
def test_origin_ignores_host(start_server: Any, host: str) -> None:
    """A hostile page is refused even when Host names the allowed site."""
    server = ws_server(start_server, EXAMPLES / "hello.py", OW_WEBSOCKET_ORIGIN="hellows.example.com")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    headers = {
        "Host": host,
        "Origin": "https://evil.example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    connection.request("GET", "/hello", headers=headers)
    response = connection.getresponse()
    assert response.status == 403
    assert "origin" in json.loads(response.read())["error"]
    connection.close()


def test_autoinit_zip_with_other_main(start_server: Any, tmp_path: Path) -> None:
    """Auto-init from a zip, with OW_AUTOINIT_MAIN naming the entry point."""
    action = tmp_path / "action.zip"
    action.write_bytes(
        make_zip(
            {
                "__main__.py": "from helper import shout\ndef loud(args):\n    return {'said': shout(args['text'])}\n",
                "helper.py": "def shout(text):\n    return text.upper()\n",
            }
        )
    )
    server = ws_server(start_server, action, OW_AUTOINIT_MAIN="loud")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"text": "hi"}) == {"said": "HI"}


def test_autoinit_tar_gz_and_bash(start_server: Any, tmp_path: Path) -> None:
    """Auto-init from a tar.gz holding an executable `exec` (generic action)."""
    action = tmp_path / "action.tar.gz"
    with tarfile.open(action, "w:gz") as archive:
        archive.add(EXAMPLES / "hello.sh", arcname="exec")
    server = ws_server(start_server, action)
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "Bash"}) == {"greeting": "Hello, Bash!"}


def test_autoinit_executable_script(start_server: Any) -> None:
    """Auto-init from a `#!/bin/bash` file: run as-is, acking on fd 3."""
    server = ws_server(start_server, EXAMPLES / "hello.sh")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "Shell"}) == {"greeting": "Hello, Shell!"}
    assert "hello.sh called with name=Shell" in server.out()


def test_state_across_messages(start_server: Any) -> None:
    """One long-lived process: module state survives from message to message."""
    server = ws_server(start_server, EXAMPLES / "counter.py")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        replies = [ask(ws, {}) for _ in range(5)]
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        later = ask(ws, {})
    assert [r["count"] for r in replies] == [1, 2, 3, 4, 5]
    assert later["count"] == 6
    assert len({r["pid"] for r in [*replies, later]}) == 1


def test_bad_json_message(start_server: Any) -> None:
    """A non-JSON message gets a JSON error reply; the connection stays usable."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        reply = ask(ws, "{not json")
        assert "not valid JSON" in reply["error"]
        assert ask(ws, {"name": "after"}) == {"greeting": "Hello, after!"}


def test_action_exits_then_serves(start_server: Any, tmp_path: Path) -> None:
    """An action that exits on one input is restarted for the next message."""
    action = tmp_path / "fragile.py"
    action.write_text(
        "import os, sys\n"
        "def main(args):\n"
        "    if args.get('die'):\n        sys.exit(3)\n"
        "    return {'pid': os.getpid()}\n"
    )
    server = ws_server(start_server, action)
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        first = ask(ws, {})
        assert ask(ws, {"die": True}) == {"error": "command exited"}
        second = ask(ws, {})
    assert first["pid"] != second["pid"]


def test_concurrent_connections_get_their_own_replies(start_server: Any) -> None:
    """20 clients at once, unique ids: each gets exactly its own replies."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    results: dict[int, list[Any]] = {}

    def client(n: int) -> None:
        with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
            results[n] = [ask(ws, {"name": f"c{n}-m{i}"}) for i in range(10)]

    concurrently(20, client)
    for n in range(20):
        assert results[n] == [{"greeting": f"Hello, c{n}-m{i}!"} for i in range(10)]


def test_run_beside_websocket(start_server: Any) -> None:
    """HTTP /run keeps working next to the WebSocket endpoint."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    assert server.run({"name": "http"}) == (200, {"greeting": "Hello, http!"})
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "ws"}) == {"greeting": "Hello, ws!"}
    assert server.run({"name": "http2"}) == (200, {"greeting": "Hello, http2!"})


def test_no_action_yet(start_server: Any) -> None:
    """WebSocket without auto-init: an error reply until /init arrives."""
    server = ws_server(start_server, None)
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "x"}) == {"error": "no action defined yet"}
        assert server.init((EXAMPLES / "hello.py").read_text())[0] == 200
        assert ask(ws, {"name": "x"}) == {"greeting": "Hello, x!"}


def test_message_metadata_cannot_be_forged(start_server: Any, tmp_path: Path) -> None:
    """Each message has its own activation id; message text cannot add keys."""
    action = tmp_path / "meta.py"
    action.write_text(
        "import os\n"
        "def main(args):\n"
        "    return {k: os.environ.get('__OW_' + k.upper()) for k in ('activation_id', 'connection_id', 'action_name')}\n"
    )
    server = ws_server(start_server, action)
    forged = '{"x": "\\"}, \\"action_name\\": \\"evil"}'
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        first, second = ask(ws, forged), ask(ws, {})
    assert first["action_name"] is None
    assert len(first["activation_id"]) == 32 and first["activation_id"] != second["activation_id"]
    assert first["connection_id"] == second["connection_id"]


def test_other_paths(start_server: Any) -> None:
    """Only the configured path upgrades; unknown paths answer 404."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with pytest.raises(InvalidStatus) as caught:
        connect(server.ws_url("/other"), open_timeout=TIMEOUT)
    assert caught.value.response.status_code == 404
    assert server.post("/nothing", b"{}")[0] == 404


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "cannot read"), ("def main(args):\n  return {\n", "Command exited abruptly"), ("", "is empty")],
)
def test_autoinit_failure_is_loud(tmp_path: Path, content: str | None, reason: str) -> None:
    """A failed auto-init says why in one log line and exits non-zero."""
    action = tmp_path / "broken.py"
    if content is not None:
        action.write_text(content)
    env = clean_env({"OW_WEBSOCKET": "/hello", "OW_AUTOINIT": str(action), "OW_WAIT_FOR_ACK": "1"})
    done = subprocess.run(
        [ACTIONLOOP, "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.decode().splitlines() if "auto-init" in line]
    assert len(lines) == 1 and str(action) in lines[0] and reason in lines[0]


def test_serve_command(tmp_path: Path) -> None:
    """`actionloop serve FILE` prints the URL and serves the file over WebSocket."""
    port = free_port()
    child = subprocess.Popen(
        [ACTIONLOOP, "serve", str(EXAMPLES / "hello.py"), "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().decode().strip().split()[-1]
        assert url == f"ws://127.0.0.1:{port}/ws"
        with connect(url, open_timeout=TIMEOUT) as ws:
            assert ask(ws, {"name": "serve"}) == {"greeting": "Hello, serve!"}
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        assert child.wait(TIMEOUT) == 0


def test_sigterm_closes_websockets_with_1001(start_server: Any) -> None:
    """On SIGTERM open WebSockets are closed with 1001 and the server exits 0."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {"name": "bye"}) == {"greeting": "Hello, bye!"}
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=TIMEOUT)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1001
    assert server.process.wait(TIMEOUT) == 0


def test_websocket_large_message(start_server: Any) -> None:
    """A 1 MB message goes through and back."""
    server = ws_server(start_server, None)
    assert server.init(b64(make_zip({"__main__.py": "def main(a):\n    return a\n"})), binary=True)[0] == 200
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT, max_size=None) as ws:
        value = {"arg": "a" * 1048561}
        assert ask(ws, value) == value


def test_hung_action_times_out_and_is_replaced(start_server: Any, tmp_path: Path) -> None:
    """A message that hangs the action gets an error after the timeout; the next is served."""
    action = tmp_path / "hang.py"
    action.write_text(
        "import os\ndef main(args):\n    while args.get('hang'):\n        pass\n    return {'pid': os.getpid()}\n"
    )
    server = ws_server(start_server, action, OW_WEBSOCKET_TIMEOUT=str(1 * TIME_FACTOR))
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        first = ask(ws, {})
        assert "did not answer within" in ask(ws, {"hang": True})["error"]
        assert ask(ws, {})["pid"] != first["pid"]


def test_binary_frames(start_server: Any) -> None:
    """Binary UTF-8 JSON is answered in a binary frame; invalid UTF-8 gets an error."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"name": "bin ❄"}).encode())
        reply = ws.recv(timeout=TIMEOUT)
        assert isinstance(reply, bytes) and json.loads(reply) == {"greeting": "Hello, bin ❄!"}
        ws.send(b"\xff\xfe{")
        assert "not valid JSON" in json.loads(ws.recv(timeout=TIMEOUT))["error"]
        assert ask(ws, {"name": "text"}) == {"greeting": "Hello, text!"}


def test_oversized_message_closes_1009(start_server: Any) -> None:
    """A message over OW_WEBSOCKET_MAX_MESSAGE closes that connection with 1009; others go on."""
    server = ws_server(start_server, EXAMPLES / "hello.py", OW_WEBSOCKET_MAX_MESSAGE="1000")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as other:
        with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"name": "x" * 2000}))
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(timeout=TIMEOUT)
            assert caught.value.rcvd is not None and caught.value.rcvd.code == 1009
        assert ask(other, {"name": "still"}) == {"greeting": "Hello, still!"}


def test_fragmented_messages(start_server: Any) -> None:
    """A message sent in fragments is one message; fragments past the size limit close with 1009."""
    server = ws_server(start_server, EXAMPLES / "hello.py", OW_WEBSOCKET_MAX_MESSAGE="1000")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        ws.send(['{"name": ', '"in ', 'parts"}'])
        assert json.loads(ws.recv(timeout=TIMEOUT)) == {"greeting": "Hello, in parts!"}
        ws.send([b'{"name": ', b'"bytes"}'])
        assert json.loads(ws.recv(timeout=TIMEOUT)) == {"greeting": "Hello, bytes!"}
        assert ask(ws, {"name": "whole"}) == {"greeting": "Hello, whole!"}
        with pytest.raises(ConnectionClosed) as caught:
            # Each fragment fits, the message does not. The server may close before the
            # last fragments are sent, so the send itself may be what sees the close.
            ws.send(['{"name": "', "x" * 600, "x" * 600, '"}'])
            ws.recv(timeout=TIMEOUT)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1009


def test_deadline_metadata(start_server: Any, tmp_path: Path) -> None:
    """Each message carries an OpenWhisk deadline (epoch ms) in __OW_DEADLINE."""
    action = tmp_path / "deadline.py"
    action.write_text(
        "import os, time\ndef main(args):\n    return {'left': int(os.environ['__OW_DEADLINE']) - time.time() * 1000}\n"
    )
    server = ws_server(start_server, action, OW_WEBSOCKET_TIMEOUT="30")
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as ws:
        assert 20000 < ask(ws, {})["left"] <= 30000


def test_client_vanishing_mid_message(start_server: Any, tmp_path: Path) -> None:
    """A client that drops its TCP connection before its reply harms no one."""
    action = tmp_path / "slow.py"
    action.write_text("import time\ndef main(args):\n    time.sleep(args.get('sleep', 0))\n    return {'ok': 1}\n")
    server = ws_server(start_server, action)
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as other:
        with connect(server.ws_url("/hello"), open_timeout=TIMEOUT, close_timeout=0.5) as gone:
            gone.send(json.dumps({"sleep": 0.5}))
            gone.socket.shutdown(socket.SHUT_RDWR)
        assert ask(other, {}) == {"ok": 1}
    with connect(server.ws_url("/hello"), open_timeout=TIMEOUT) as fresh:
        assert ask(fresh, {}) == {"ok": 1}
    assert server.process.poll() is None


def test_upgrade_on_a_connection_used_for_http_before(start_server: Any) -> None:
    """A proxy may reuse a kept-alive connection for an upgrade: it is served like a fresh one."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200 and json.loads(response.read())["live"] is True
        with connect(server.ws_url("/hello"), sock=sock, open_timeout=TIMEOUT) as ws:
            assert ask(ws, {"name": "again"}) == {"greeting": "Hello, again!"}
            assert ask(ws, {"name": "twice"}) == {"greeting": "Hello, twice!"}


@pytest.mark.parametrize("first", [True, False])
def test_plain_get_of_the_websocket_path(start_server: Any, first: bool) -> None:
    """A GET of the WebSocket path that is not an upgrade gets 400 and a JSON reason."""
    server = ws_server(start_server, EXAMPLES / "hello.py")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    if not first:  # the same on a connection aiohttp has served before
        connection.request("GET", "/healthz")
        assert connection.getresponse().read()
    connection.request("GET", "/hello")
    response = connection.getresponse()
    assert response.status == 400
    assert "WebSocket" in json.loads(response.read())["error"]
    connection.close()


def test_start_up_leaves_unused_libraries_unloaded() -> None:
    """The modules a WebSocket pod starts with load neither aiohttp nor picows' client side."""
    probe = (
        "import sys, actionloop.cli, actionloop.listener, actionloop.websocket\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'python_socks', 'aiofastnet', 'picows'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=clean_env())
    assert out.stdout.strip() == "['picows']", out.stdout


def test_run_keys_do_not_reach_later_websocket_activations(start_server: Any, tmp_path: Path) -> None:
    """The api_key of a /run is not in the environment a later WebSocket message's activation sees."""
    action = tmp_path / "env.py"
    action.write_text("import os\ndef main(args):\n    return {'key': os.environ.get('__OW_API_KEY')}\n")
    server = ws_server(start_server, action, "/ws")
    assert server.run({}, api_key="secret") == (200, {"key": "secret"})
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
        assert ask(ws, {}) == {"key": None}
