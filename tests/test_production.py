"""Production WebSocket serving (contract part C): process modes, limits,
timeouts, auth, metrics, and a bounded fuzz of the message path."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, IMAGE_ENV, TIME_FACTOR, ask, concurrently
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

TIMEOUT = 20 * TIME_FACTOR

ECHO_ID = "import os\ndef main(args):\n    return {'id': args.get('id'), 'pid': os.getpid()}\n"
SLOW = (
    "import os, time\n"
    "def main(args):\n"
    "    start = time.time()\n"
    "    time.sleep(args.get('sleep', 0))\n"
    "    while args.get('hang'):\n        pass\n"
    "    if args.get('size'):\n        return {'pad': 'x' * args['size']}\n"
    "    return {'pid': os.getpid(), 'start': start, 'end': time.time(), 'id': args.get('id')}\n"
)


def serve(start_server: Any, tmp_path: Path, source: str, **env: str) -> Any:
    action = tmp_path / f"action{len(list(tmp_path.glob('action*.py')))}.py"
    action.write_text(source)
    return start_server({**IMAGE_ENV, "OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(action), **env})


def metrics(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics and parse it with prometheus-client's own parser."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("mode", ["shared", "pool", "connection"])
def test_fifty_clients_each_get_their_own_replies_in_order(start_server: Any, tmp_path: Path, mode: str) -> None:
    """50 concurrent connections with unique ids: exactly their own replies, in order."""
    server = serve(start_server, tmp_path, ECHO_ID, OW_PROCESS_MODE=mode, OW_POOL_SIZE="3")
    pids: dict[int, set[int]] = {}

    def client(n: int) -> None:
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
            for i in range(5):
                ws.send(json.dumps({"id": f"{n}-{i}"}))
            replies = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in range(5)]
        assert [r["id"] for r in replies] == [f"{n}-{i}" for i in range(5)]
        pids[n] = {r["pid"] for r in replies}

    concurrently(50, client)
    everyone = set().union(*pids.values())
    expected = {"shared": 1, "pool": 3, "connection": 50}[mode]
    if mode == "connection":
        assert len(everyone) == expected and all(len(p) == 1 for p in pids.values())
    else:
        assert len(everyone) <= expected


def test_connection_mode_isolates_state(start_server: Any, tmp_path: Path) -> None:
    """Each connection has its own process and state; it stops at disconnect."""
    server = start_server(
        {"OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(EXAMPLES / "counter.py"), "OW_PROCESS_MODE": "connection"}
    )
    with (
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as a,
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as b,
    ):
        counts_a = [ask(a, {}) for _ in range(3)]
        counts_b = [ask(b, {}) for _ in range(2)]
    assert [c["count"] for c in counts_a] == [1, 2, 3] and [c["count"] for c in counts_b] == [1, 2]
    pid = counts_a[0]["pid"]
    assert pid != counts_b[0]["pid"]
    deadline = time.monotonic() + TIMEOUT
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the connection's process outlived it"


def test_connection_mode_process_cap(start_server: Any, tmp_path: Path) -> None:
    """Beyond OW_MAX_PROCESSES a new connection is refused at the handshake."""
    server = serve(start_server, tmp_path, ECHO_ID, OW_PROCESS_MODE="connection", OW_MAX_PROCESSES="1")
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as first:
        with pytest.raises(InvalidStatus) as caught:
            connect(server.ws_url("/ws"), open_timeout=TIMEOUT)
        assert caught.value.response.status_code == 503
        assert ask(first, {"id": 1})["id"] == 1
    # Its process is stopped once the close handshake is over: then there is room.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as again:
                assert ask(again, {"id": 2})["id"] == 2
            break
        except InvalidStatus:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_pool_runs_in_parallel(start_server: Any, tmp_path: Path) -> None:
    """Two slow messages on two connections run at the same time on two processes."""
    server = serve(start_server, tmp_path, SLOW, OW_PROCESS_MODE="pool", OW_POOL_SIZE="2")
    results: dict[int, Any] = {}

    def client(n: int) -> None:
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
            results[n] = ask(ws, {"sleep": 1})

    concurrently(2, client)
    first, second = sorted(results.values(), key=lambda r: r["start"])
    assert first["pid"] != second["pid"]
    assert second["start"] < first["end"], "the activations did not overlap"


def test_hung_action_replaced_while_others_are_served(start_server: Any, tmp_path: Path) -> None:
    """A hung process is killed after the timeout; another client is served meanwhile."""
    server = serve(start_server, tmp_path, SLOW, OW_PROCESS_MODE="pool", OW_POOL_SIZE="2", OW_WEBSOCKET_TIMEOUT="3")
    with (
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as hung,
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as other,
    ):
        hung.send(json.dumps({"hang": True}))
        served = [ask(other, {"id": i})["id"] for i in range(10)]
        assert served == list(range(10))
        error = json.loads(hung.recv(timeout=TIMEOUT))
        assert "did not answer within 3s" in error["error"]
        assert ask(hung, {"id": "after"})["id"] == "after"
    counts = metrics(server)
    assert counts[("actionloop_errors_total", (("kind", "timeout"),))] == 1
    assert counts[("actionloop_action_restarts_total", ())] == 1


def test_max_connections(start_server: Any, tmp_path: Path) -> None:
    """Beyond OW_WEBSOCKET_MAX_CONNECTIONS the handshake is refused with 503."""
    server = serve(start_server, tmp_path, ECHO_ID, OW_WEBSOCKET_MAX_CONNECTIONS="2")
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as a, connect(server.ws_url("/ws"), open_timeout=TIMEOUT):
        with pytest.raises(InvalidStatus) as caught:
            connect(server.ws_url("/ws"), open_timeout=TIMEOUT)
        assert caught.value.response.status_code == 503
        assert ask(a, {"id": "a"})["id"] == "a"
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as c:
        assert ask(c, {"id": "c"})["id"] == "c"


def test_idle_timeout(start_server: Any, tmp_path: Path) -> None:
    """A silent connection is closed (1000) after the idle timeout; a slow reply is not idleness."""
    server = serve(start_server, tmp_path, SLOW, OW_WEBSOCKET_IDLE_TIMEOUT="1")
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
        assert "pid" in ask(ws, {"sleep": 2})
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=TIMEOUT)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1000
        assert caught.value.rcvd.reason == "idle timeout"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_websocket(port: int, path: str) -> socket.socket:
    """A client that does the handshake and then never reads: only raw sockets can be that rude."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    sock.sendall(f"{request}Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    return sock


def text_frame(payload: bytes) -> bytes:
    """One masked client text frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    length = len(payload)
    header = bytes([0x81]) + (
        bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big")
    )
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_client_that_never_reads_is_held_back(start_server: Any, tmp_path: Path) -> None:
    """A client sending fast and never reading stalls only itself: reading stops, memory stays bounded."""
    server = serve(start_server, tmp_path, SLOW)
    before = rss_kib(server.process.pid)
    rude = raw_websocket(server.port, "/ws")
    rude.settimeout(2 * TIME_FACTOR)
    frame = text_frame(json.dumps({"size": 65536, "pad": "x" * 1000}).encode())
    sent = 0
    with contextlib.suppress(TimeoutError):
        while sent < 3000:  # 3000 replies of 64 KiB: 192 MiB if buffered
            rude.sendall(frame)
            sent += 1
    time.sleep(1 * TIME_FACTOR)
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as polite:
        assert "pid" in ask(polite, {"id": 1})
    grown = rss_kib(server.process.pid) - before
    received = metrics(server)[("actionloop_messages_received_total", ())]
    rude.close()
    assert received < 1000, (received, sent)
    assert grown < 64 * 1024, f"server grew by {grown} KiB"


@pytest.mark.parametrize(
    ("how", "status"),
    [("none", 401), ("wrong-header", 403), ("header", 101), ("query", 101), ("subprotocol", 101), ("wrong-query", 403)],
)
def test_token_auth(start_server: Any, tmp_path: Path, how: str, status: int) -> None:
    """OW_WEBSOCKET_TOKEN: by header, query parameter or subprotocol; 401 without, 403 wrong."""
    server = serve(start_server, tmp_path, ECHO_ID, OW_WEBSOCKET_TOKEN="s3cret")
    url, headers, protocols = server.ws_url("/ws"), {}, None
    if how == "header":
        headers = {"Authorization": "Bearer s3cret"}
    elif how == "wrong-header":
        headers = {"Authorization": "Bearer nope"}
    elif how == "query":
        url += "?token=s3cret"
    elif how == "wrong-query":
        url += "?token=nope"
    elif how == "subprotocol":
        protocols = ["actionloop", "bearer.s3cret"]
    if status != 101:
        with pytest.raises(InvalidStatus) as caught:
            connect(url, additional_headers=headers, subprotocols=protocols, open_timeout=TIMEOUT)  # type: ignore[arg-type]
        assert caught.value.response.status_code == status
        return
    with connect(url, additional_headers=headers, subprotocols=protocols, open_timeout=TIMEOUT) as ws:  # type: ignore[arg-type]
        assert ask(ws, {"id": how})["id"] == how
        if protocols:
            assert ws.subprotocol == "actionloop"


def test_metrics_after_known_workload(start_server: Any, tmp_path: Path) -> None:
    """Counts scraped from /metrics match what was sent; one log line per open and close."""
    source = "import sys\ndef main(args):\n    if args.get('die'):\n        sys.exit(1)\n    return {'ok': True}\n"
    server = serve(start_server, tmp_path, source)
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
        for message in [{}, {}, {}, "{oops", {"die": 1}, {}, {}]:
            ask(ws, message)
    deadline = time.monotonic() + TIMEOUT
    while metrics(server)[("actionloop_websocket_connections", ())] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = metrics(server)
    assert counts[("actionloop_messages_received_total", ())] == 7
    assert counts[("actionloop_messages_sent_total", ())] == 7
    assert counts[("actionloop_errors_total", (("kind", "bad_json"),))] == 1
    assert counts[("actionloop_errors_total", (("kind", "command_exited"),))] == 1
    assert counts[("actionloop_action_restarts_total", ())] == 1
    assert counts[("actionloop_invocation_seconds_count", ())] == 6
    assert counts[("actionloop_websocket_connections_opened_total", ())] == 1
    assert counts[("actionloop_websocket_connections", ())] == 0
    assert counts[("actionloop_messages_in_flight", ())] == 0
    events = [json.loads(line) for line in server.err().splitlines() if line.startswith('{"time"')]
    assert [e["event"] for e in events] == ["websocket_open", "websocket_close"]
    assert events[0]["connection"] == events[1]["connection"] and events[1]["code"] == 1000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
messages = st.one_of(
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.integers(min_value=-(10**60), max_value=10**60).map(str),
    st.integers(min_value=1, max_value=3000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(min_value=1, max_value=3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.sampled_from(["NaN", "Infinity", "", " ", "\n", "[1,]", '{"a" 1}', "\ud800".encode("utf-8", "surrogatepass")]),
)


def test_fuzz_message_path(start_server: Any, tmp_path: Path) -> None:
    """Random bytes, text, deep JSON, huge numbers, invalid UTF-8: every message gets a reply; the server stays up."""
    server = serve(start_server, tmp_path, "def main(args):\n    return {'echo': args}\n")
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT, max_size=None) as ws:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(messages)
        def one(message: str | bytes) -> None:
            ws.send(message)
            reply = json.loads(ws.recv(timeout=TIMEOUT))
            assert isinstance(reply, dict) and set(reply) <= {"echo", "error"} and reply

        one()
        assert ask(ws, {"still": "up"}) == {"echo": {"still": "up"}}
    assert server.process.poll() is None
    os.kill(server.process.pid, 0)


def test_run_stays_one_at_a_time_in_pool_mode(start_server: Any, tmp_path: Path) -> None:
    """HTTP /run keeps OpenWhisk's one-activation-at-a-time semantics even with a pool."""
    server = serve(start_server, tmp_path, SLOW, OW_PROCESS_MODE="pool", OW_POOL_SIZE="2")
    results: dict[int, Any] = {}

    def call(n: int) -> None:
        results[n] = server.run({"sleep": 0.5})[1]

    concurrently(2, call)
    first, second = sorted(results.values(), key=lambda r: r["start"])
    assert second["start"] >= first["end"], "two /run activations overlapped"


def test_connection_process_that_cannot_start(start_server: Any, tmp_path: Path) -> None:
    """Connection mode: if the connection's own process cannot start, it is closed with 1011 and the reason."""
    marker = tmp_path / "started-once"
    source = (
        "import pathlib\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if marker.exists():\n    raise RuntimeError('only one start allowed')\n"
        "marker.touch()\n"
        "def main(args):\n    return args\n"
    )
    server = serve(start_server, tmp_path, source, OW_PROCESS_MODE="connection")
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws, pytest.raises(ConnectionClosed) as caught:
        ws.send("{}")
        ws.recv(timeout=TIMEOUT)
    assert caught.value.rcvd is not None and caught.value.rcvd.code == 1011
    assert "exited abruptly during initialization" in caught.value.rcvd.reason
    assert metrics(server)[("actionloop_errors_total", (("kind", "start_failed"),))] == 1
    assert metrics(server)[("actionloop_websocket_connections", ())] == 0


DIES = (
    "import os, time\n"
    "def main(args):\n"
    "    time.sleep(args.get('sleep', 0))\n"
    "    if args.get('die'):\n        os._exit(3)\n"
    "    return {'pid': os.getpid(), 'id': args.get('id')}\n"
)


def test_message_waiting_behind_a_crash_is_served(start_server: Any, tmp_path: Path) -> None:
    """Shared mode: a message queued behind one that kills the process is answered by the new process."""
    server = serve(start_server, tmp_path, DIES)
    with (
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as dying,
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as waiting,
    ):
        first_pid = ask(waiting, {"id": 0})["pid"]
        dying.send(json.dumps({"die": True, "sleep": 0.5 * TIME_FACTOR}))
        time.sleep(0.2 * TIME_FACTOR)  # the action is now on the dying message
        waiting.send(json.dumps({"id": 1}))
        assert json.loads(dying.recv(timeout=TIMEOUT)) == {"error": "command exited"}
        reply = json.loads(waiting.recv(timeout=TIMEOUT))
        assert reply["id"] == 1 and reply["pid"] != first_pid
    counts = metrics(server)
    assert counts[("actionloop_errors_total", (("kind", "command_exited"),))] == 1
    assert counts[("actionloop_action_restarts_total", ())] == 1


def test_timeout_runs_from_when_the_action_takes_the_message(start_server: Any, tmp_path: Path) -> None:
    """Shared mode: time spent waiting behind another message does not count against the timeout."""
    timeout = 3 * TIME_FACTOR
    server = serve(start_server, tmp_path, SLOW, OW_WEBSOCKET_TIMEOUT=str(timeout))
    with (
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as a,
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as b,
    ):
        a.send(json.dumps({"sleep": timeout * 2 / 3, "id": "a"}))
        b.send(json.dumps({"sleep": timeout * 2 / 3, "id": "b"}))
        replies = [json.loads(a.recv(timeout=TIMEOUT)), json.loads(b.recv(timeout=TIMEOUT))]
    assert [r.get("id") for r in replies] == ["a", "b"], replies
    # One after the other, on the one process (which connection's message the
    # server read first is the event loop's choice: both came at once).
    first, second = sorted(replies, key=lambda r: r["start"])
    assert first["end"] <= second["start"]


ECHO_SIZE = "def main(args):\n    return {'id': args['id'], 'size': len(args['pad']), 'ends': args['pad'][-8:]}\n"


def test_large_messages_at_once_share_the_pipe_intact(start_server: Any, tmp_path: Path) -> None:
    """Shared mode: large messages arriving together (more than a pipe holds) each reach the action whole."""
    server = serve(start_server, tmp_path, ECHO_SIZE)
    size = 300_000  # several together exceed the 64 KiB pipe: the writes to the action are partial

    def client(n: int) -> None:
        pad = "x" * (size - 8) + f"{n:08d}"
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT, max_size=None) as ws:
            for i in range(3):
                assert ask(ws, {"id": f"{n}-{i}", "pad": pad}) == {"id": f"{n}-{i}", "size": size, "ends": f"{n:08d}"}

    concurrently(6, client)


@pytest.mark.parametrize("mode", ["shared", "connection"])
def test_drain_ends_on_time(start_server: Any, tmp_path: Path, mode: str) -> None:
    """SIGTERM with more work queued than OW_DRAIN_TIMEOUT: every client gets a reply or a close frame, queued work is dropped, the exit is on time."""
    started = tmp_path / "started.log"
    source = f"import time\ndef main(args):\n    open({str(started)!r}, 'a').write('x\\n')\n    time.sleep(args['sleep'])\n    return args\n"
    drain, grace = 2 * TIME_FACTOR, 1 * TIME_FACTOR
    server = serve(
        start_server, tmp_path, source, OW_PROCESS_MODE=mode, OW_DRAIN_TIMEOUT=str(drain), OW_STOP_GRACE=str(grace)
    )
    codes = []
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(server.ws_url("/ws"), open_timeout=TIMEOUT)) for _ in range(12)]
        for n, ws in enumerate(clients):
            # Shared: 12 s of work queued; connection: each busy past the drain.
            ws.send(json.dumps({"n": n, "sleep": 1 if mode == "shared" else 10}))
        time.sleep(0.5 * TIME_FACTOR)
        began = time.monotonic()
        server.process.send_signal(15)
        for ws in clients:
            try:
                ws.recv(timeout=TIMEOUT)  # a reply, for the messages the drain had time for
                ws.recv(timeout=TIMEOUT)
            except ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd is not None else None)
        assert server.process.wait(TIMEOUT) == 0
    took = time.monotonic() - began
    assert codes == [1001] * len(clients), codes  # never cut without a close frame
    assert took < drain + 1 + grace + 2 * TIME_FACTOR, took
    if mode == "shared":
        assert len(started.read_text().splitlines()) <= drain + 2  # the rest of the queue was dropped


ESCAPER = """import os, subprocess, time

def main(args):
    setsid = subprocess.Popen(["setsid", "sleep", "300"]).pid
    read, write = os.pipe()
    if os.fork() == 0:  # a daemon: its own session, its parent gone
        os.setsid()
        if os.fork() == 0:
            os.write(write, b"%d" % os.getpid())
            time.sleep(300)
        os._exit(0)
    os.close(write)
    daemon = int(os.read(read, 20))
    if args.get("exit"):
        os._exit(1)
    return {"pids": [setsid, daemon]}
"""


def gone(pid: int) -> bool:
    """The process has ended (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + 10 * TIME_FACTOR
    while time.monotonic() < deadline and not all(gone(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if not gone(pid)]


def test_processes_that_leave_the_group_are_stopped_too(start_server: Any, tmp_path: Path) -> None:
    """An action's children that call setsid, or daemonise, end with the server; and with their action's restart."""
    server = serve(start_server, tmp_path, ESCAPER)
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
        escaped = ask(ws, {})["pids"]
        assert not any(gone(pid) for pid in escaped)  # they run now
        ws.send(json.dumps({"exit": True}))  # the action dies; what it left behind goes with it
        assert "error" in json.loads(ws.recv(timeout=TIMEOUT))
    try:
        assert wait_gone(escaped) == []
        later = [*escaped]
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
            later = ask(ws, {})["pids"]
        assert server.stop() == 0
        assert wait_gone(later) == []
    finally:
        for pid in escaped + later:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
