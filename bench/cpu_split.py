"""CPU per message of the server and of its action processes, apart.

    python bench/cpu_split.py [--src DIR] [--mode connection] [--clients 8] [--messages 24000]

Starts `python -m actionloop` (from DIR/src if given: compare two checkouts
with the same Python), pinned to CPU 0, with bench/hello_action.py; opens the
clients, sends one message on each, then measures: each client sends its
share in a closed loop, and the CPU the server process and its children (the
action processes, alive throughout) spent is read from /proc. bench/run.py
counts the whole tree together; this says on which side of the pipe a
difference is. Clients are threads of this process: pin it elsewhere
(`taskset -c 1`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=True)
    return [int(word) for word in listed.stdout.split()]


def split(pid: int) -> tuple[float, float]:
    """CPU seconds of the server, and of its children now."""
    return cpu_seconds(pid), sum(cpu_seconds(child) for child in children(pid))


def send(ws: ClientConnection, count: int) -> None:
    """A closed loop: each message waits for the reply to the one before."""
    for _ in range(count):
        ws.send('{"name": "bench"}')
        ws.recv()


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not listen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="a checkout whose src/ to run (default: the installed actionloop)")
    parser.add_argument("--mode", default="connection", choices=["shared", "pool", "connection"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--messages", type=int, default=24000)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OW_WEBSOCKET="/ws", OW_AUTOINIT=str(HERE / "hello_action.py"), OW_WAIT_FOR_ACK="1")
    env.update(OW_PROCESS_MODE=args.mode, OW_DRAIN_DELAY="0", OW_PORT=str(port), OW_HOST="127.0.0.1")
    if args.src:
        env["PYTHONPATH"] = str(args.src.resolve() / "src")
    command = ["taskset", "-c", "0", sys.executable, "-m", "actionloop"]
    quiet = subprocess.DEVNULL
    server = subprocess.Popen(command, env=env, stdout=quiet, stderr=quiet, start_new_session=True)
    try:
        wait_listening(port)
        each = args.messages // args.clients
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(connect(f"ws://127.0.0.1:{port}/ws")) for _ in range(args.clients)]
            for ws in clients:  # every action process started and warm
                ws.send('{"name": "warm"}')
                ws.recv()
            before = split(server.pid)
            threads = [threading.Thread(target=send, args=(ws, each)) for ws in clients]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            after = split(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    total = each * args.clients
    server_us, actions_us = ((a - b) * 1e6 / total for a, b in zip(after, before, strict=True))
    print(f"{args.mode} C={args.clients}: server {server_us:.1f} us/msg, actions {actions_us:.1f} us/msg")


if __name__ == "__main__":
    main()
