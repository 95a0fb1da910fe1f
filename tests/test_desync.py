"""Replies never cross, whatever the action writes on fd 3 (contract part C).

Real servers, real WebSocket clients, actions that write lines nobody asked
for: a stray line, garbage, a forked child that writes later, a forked child
that goes on serving. No reply may reach a client it does not belong to;
every client caught in it gets an error; the process is restarted.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import IMAGE_ENV, TIME_FACTOR, concurrently
from websockets.sync.client import connect

TIMEOUT = 20 * TIME_FACTOR

# Every tenth message of a client makes the action misbehave in one way.
ACTION = """
import os, time

def main(args):
    trouble = args.get("trouble")
    if trouble == "extra":
        os.write(3, b'{"client": "nobody", "n": -1}\\n')
    elif trouble == "garbage":
        os.write(3, b"garbage\\n")
    elif trouble == "child":
        if os.fork() == 0:
            time.sleep(0.01)
            os.write(3, b'{"client": "child", "n": -2}\\n')
            os._exit(0)
    elif trouble == "twin" and os.fork() == 0:
        pass  # the child goes on in the launcher's loop, answering lines too
    time.sleep(0.002)
    return {"client": args["client"], "n": args["n"], "pid": os.getpid()}
"""

TROUBLES = ("extra", "garbage", "child", "twin")


def hammer(server: Any, clients: int, seconds: float) -> dict[str, int]:
    """`clients` connections send messages for `seconds`; count what comes back."""
    counts = {"right": 0, "errors": 0, "wrong": 0}
    lock = threading.Lock()
    pids: set[int] = set()

    def client(me: int) -> None:
        deadline = time.monotonic() + seconds
        n = 0
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
            while time.monotonic() < deadline:
                n += 1
                trouble = TROUBLES[(n // 10 + me) % len(TROUBLES)] if n % 10 == 0 else None
                ws.send(json.dumps({"client": me, "n": n, "trouble": trouble}))
                reply = json.loads(ws.recv(timeout=TIMEOUT))
                with lock:
                    if "error" in reply:
                        counts["errors"] += 1
                    elif reply.get("client") == me and reply.get("n") == n:
                        counts["right"] += 1
                        pids.add(reply["pid"])
                    else:
                        counts["wrong"] += 1

    concurrently(clients, client)
    counts["pids"] = len(pids)
    return counts


@pytest.mark.parametrize("mode", ["shared", "pool"])
def test_stray_lines_never_reach_a_client(start_server: Any, tmp_path: Path, mode: str) -> None:
    """10 clients, actions writing stray, garbage and forked lines: none delivered, errors given, restarts done."""
    action = tmp_path / "action.py"
    action.write_text(ACTION)
    env = {**IMAGE_ENV, "OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(action), "OW_PROCESS_MODE": mode}
    server = start_server({**env, "OW_POOL_SIZE": "2"})
    counts = hammer(server, clients=10, seconds=4 * TIME_FACTOR)
    print(mode, counts)  # for the record: pytest -s shows it
    assert counts["wrong"] == 0, counts
    assert counts["errors"] > 0, counts
    assert counts["right"] > 100, counts
    assert counts["pids"] > 2, counts  # processes were replaced
    err = server.err()
    assert "not the result of an activation sent to it" in err
    assert "it is restarted" in err


def test_generic_program_line_with_nothing_in_flight(start_server: Any, tmp_path: Path) -> None:
    """A generic program's line that arrives with nothing in flight is logged, never delivered; the process is replaced."""
    program = tmp_path / "exec"
    program.write_text(
        "#!/bin/bash\n"
        "while read -r line; do\n"
        '  echo "{\\"pid\\": $$}" >&3\n'
        '  case "$line" in *late*) (sleep 0.3; echo \'{"late": true}\' >&3) & ;; esac\n'
        "done\n"
    )
    program.chmod(0o755)
    server = start_server({"OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(program)})
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"late": 1}))
        first = json.loads(ws.recv(timeout=TIMEOUT))
        time.sleep(1.0 * TIME_FACTOR)  # the late line arrives with nothing in flight
        ws.send("{}")
        second = json.loads(ws.recv(timeout=TIMEOUT))
    assert "pid" in first and "pid" in second, (first, second)
    assert second["pid"] != first["pid"]
    assert "late" in server.err() and "it is restarted" in server.err()


def test_clients_that_vanish_mid_flight_cost_nobody_else(start_server: Any, tmp_path: Path) -> None:
    """Clients that vanish with messages in flight cost the others none of their replies."""
    action = tmp_path / "action.py"
    action.write_text("import time\ndef main(args):\n    time.sleep(0.01)\n    return args\n")
    server = start_server({**IMAGE_ENV, "OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(action)})
    for _ in range(5):  # clients that send and vanish while their messages are in flight
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
            for n in range(8):
                ws.send(json.dumps({"n": n}))
            ws.close_socket()

    def client(me: int) -> None:
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
            for n in range(30):
                ws.send(json.dumps({"me": me, "n": n}))
                assert json.loads(ws.recv(timeout=TIMEOUT)) == {"me": me, "n": n}

    concurrently(8, client)


GENERIC = """#!/usr/bin/env python3
import json, os, sys, time
for line in sys.stdin:
    value = json.loads(line).get("value", {})
    out = json.dumps({"client": value.get("client"), "n": value.get("n"), "pid": os.getpid()}) + "\\n"
    if value.get("trouble"):
        out += json.dumps({"client": "nobody", "n": -1}) + "\\n"  # one debug line, with the result
    time.sleep(0.002)
    os.write(3, out.encode())
"""


def test_generic_program_extra_line_under_load(start_server: Any, tmp_path: Path) -> None:
    """A generic program writing an extra line with a result, 8 clients in shared mode: no reply goes to another client."""
    program = tmp_path / "exec"
    program.write_text(GENERIC)
    program.chmod(0o755)
    server = start_server({"OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(program)})
    counts = hammer(server, clients=8, seconds=3 * TIME_FACTOR)
    print("generic", counts)  # for the record: pytest -s shows it
    assert counts["wrong"] == 0, counts
    assert counts["right"] > 100, counts
    assert "not the result of an activation sent to it" in server.err()
