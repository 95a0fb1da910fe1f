"""Benchmark actionloop against websocketd and an in-process echo, in one run.

    python bench/run.py                      # the full run (a few minutes)
    python bench/run.py --quick              # seconds: what the CI test runs
    python bench/run.py --save               # also rewrite bench/RESULTS.md

Each server is started by this script, measured, and stopped, one after the
other on the same machine. Clients are closed-loop picows clients on uvloop,
spread over worker processes: each connection waits for its reply before
sending the next message. Server CPU is read from /proc over the whole
process tree (action processes included; reaped children through cutime),
which is far steadier than msg/s on a shared machine. With --pin (the
default where possible) servers and clients share CPU 0, as in issue 5.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import datetime
import http.client
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
PAYLOAD = b'{"name": "bench"}'
EXPECTED = b'"greeting"'
NOTES = "## Notes"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------- /proc


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pids(root: int) -> list[int]:
    tree, pids, todo = children_of(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    return pids


def cpu_seconds(root: int) -> float:
    """utime+stime of the live tree, plus what reaped children left in cutime/cstime."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / TICK


def rss_kib(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
        except OSError:
            continue
    return total


# ---------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    path: str = "/ws"
    http_run: bool = False
    per_connection_process: bool = False


def server_specs(port: int) -> dict[str, ServerSpec]:
    actionloop = str(Path(sys.executable).parent / "actionloop")
    env = {"OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(HERE / "hello_action.py"), "OW_PORT": str(port)}
    env |= {"OW_HOST": "127.0.0.1", "OW_WAIT_FOR_ACK": "1", "OW_WEBSOCKET_MAX_CONNECTIONS": "100000"}
    specs = {
        f"actionloop-{mode}": ServerSpec(
            f"actionloop-{mode}",
            [actionloop],
            env | {"OW_PROCESS_MODE": mode, "OW_MAX_PROCESSES": "1000"},
            http_run=True,
            per_connection_process=mode == "connection",
        )
        for mode in ("shared", "pool", "connection")
    }
    websocketd = shutil.which("websocketd")
    if websocketd:
        command = [websocketd, "--address=127.0.0.1", f"--port={port}", sys.executable, str(HERE / "hello_lines.py")]
        specs["websocketd"] = ServerSpec("websocketd", command, path="/", per_connection_process=True)
    specs["inprocess-echo"] = ServerSpec("inprocess-echo", [sys.executable, str(HERE / "echo_server.py"), str(port)])
    return specs


class Server:
    def __init__(self, spec: ServerSpec, port: int, pin: bool, folder: Path) -> None:
        self.spec, self.port = spec, port
        prefix = ["taskset", "-c", "0"] if pin else []
        self.process = subprocess.Popen(
            prefix + spec.command,
            env={**os.environ, **spec.env},
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the sentinels and logs: a log collector's job
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started = time.perf_counter()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.spec.path}"

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# ---------------------------------------------------------------- clients


async def closed_loop(url: str, connections: int, warmup: float, duration: float) -> tuple[int, list[float]]:
    """`connections` closed-loop clients; (messages in the window, latencies)."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    latencies: list[float] = []
    state = {"measuring": False, "stop": False, "count": 0}

    class Client(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            self.transport = transport
            self.sent = time.perf_counter()
            transport.send(WSMsgType.TEXT, PAYLOAD)

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type != WSMsgType.TEXT or state["stop"]:
                return
            now = time.perf_counter()
            if state["measuring"]:
                state["count"] += 1
                latencies.append(now - self.sent)
            self.sent = now
            transport.send(WSMsgType.TEXT, PAYLOAD)

    transports = [(await ws_connect(Client, url))[0] for _ in range(connections)]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    await asyncio.sleep(duration)
    state["measuring"], state["stop"] = False, True
    for transport in transports:
        transport.send_close()
        transport.disconnect()
    return state["count"], latencies


def client_worker(url: str, connections: int, warmup: float, duration: float, pin: bool, out: Any) -> None:
    import uvloop

    if pin:
        os.sched_setaffinity(0, {0})
    before = resource.getrusage(resource.RUSAGE_SELF)
    count, latencies = uvloop.run(closed_loop(url, connections, warmup, duration))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.put((count, latencies, cpu * duration / (warmup + duration)))


def load(server: Server, concurrency: int, args: argparse.Namespace) -> dict[str, float]:
    """Closed-loop load at one concurrency: msg/s, latency, CPU per 1,000 messages."""
    workers = 1 if concurrency == 1 else min(args.client_processes, concurrency)
    shares = [concurrency // workers + (1 if i < concurrency % workers else 0) for i in range(workers)]
    out: multiprocessing.Queue[Any] = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=client_worker, args=(server.url, n, args.warmup, args.duration, args.pin, out))
        for n in shares
    ]
    for proc in procs:
        proc.start()
    time.sleep(args.warmup)
    cpu_before = cpu_seconds(server.process.pid)
    time.sleep(args.duration)
    cpu_after = cpu_seconds(server.process.pid)
    results = [out.get(timeout=60 + args.duration) for _ in procs]
    for proc in procs:
        proc.join(30)
    count = sum(r[0] for r in results)
    latencies = sorted(latency for r in results for latency in r[1])
    client_cpu = sum(r[2] for r in results)
    per_thousand = 1000 / count if count else float("nan")
    return {
        "msgs": count / args.duration,
        "p50": percentile(latencies, 50) * 1000,
        "p99": percentile(latencies, 99) * 1000,
        "cpu": (cpu_after - cpu_before) * 1000 * per_thousand,
        "client_cpu": client_cpu * 1000 * per_thousand,
    }


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * pct / 100))]


def http_run(server: Server, args: argparse.Namespace) -> float:
    """HTTP /run at C=1 with keep-alive: msg/s."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = b'{"value": ' + PAYLOAD + b"}"
    count, end = 0, time.perf_counter() + args.duration
    while time.perf_counter() < end:
        connection.request("POST", "/run", body=body, headers={"Content-Type": "application/json"})
        reply = connection.getresponse().read()
        assert EXPECTED in reply, reply
        count += 1
    connection.close()
    return count / args.duration


async def idle(server: Server, count: int) -> tuple[float, int]:
    """Open `count` idle connections, then one message on each: (KiB per connection, answered)."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    answered = 0
    done = asyncio.Event()

    class Idle(WSListener):
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            nonlocal answered
            if frame.msg_type == WSMsgType.TEXT and EXPECTED in frame.get_payload_as_bytes():
                answered += 1
                if answered == count:
                    done.set()

    base = rss_kib(server.process.pid)
    transports = []
    for _ in range(count):
        transports.append((await ws_connect(Idle, server.url))[0])
    await asyncio.sleep(1.0)
    grown = rss_kib(server.process.pid) - base
    for transport in transports:
        transport.send(WSMsgType.TEXT, PAYLOAD)
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        pass
    for transport in transports:
        transport.disconnect()
    return grown / count, answered


async def first_answer(url: str, deadline: float) -> None:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    answered = asyncio.get_running_loop().create_future()

    class Once(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            transport.send(WSMsgType.TEXT, PAYLOAD)

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.TEXT and not answered.done():
                payload = frame.get_payload_as_bytes()
                if EXPECTED in payload:
                    answered.set_result(None)
                else:
                    answered.set_exception(RuntimeError(f"first answer: {payload[:200]!r}"))

    while True:
        try:
            transport, _ = await ws_connect(Once, url)
            break
        except OSError:
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.002)
    await asyncio.wait_for(answered, 30)
    transport.disconnect()


def cold_start(spec: ServerSpec, args: argparse.Namespace, folder: Path) -> float:
    """Process start to the first answered message, in ms (median of a few)."""
    import uvloop

    times = []
    for _ in range(args.cold_trials):
        port = free_port()
        server = Server(server_specs(port)[spec.name], port, args.pin, folder)
        try:
            uvloop.run(first_answer(server.url, time.perf_counter() + 30))
            times.append((time.perf_counter() - server.started) * 1000)
        finally:
            server.stop()
    return statistics.median(times)


def wait_listening(server: Server) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"{server.spec.name} did not start")


# ---------------------------------------------------------------- the run


def measure(spec: ServerSpec, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import uvloop

    port = free_port()
    spec = server_specs(port)[spec.name]
    server = Server(spec, port, args.pin, folder)
    row: dict[str, Any] = {"server": spec.name}
    try:
        wait_listening(server)
        for concurrency in args.concurrency:
            row[concurrency] = load(server, concurrency, args)
        if spec.http_run:
            row["run"] = http_run(server, args)
        count = args.idle_per_process if spec.per_connection_process else args.idle
        row["idle"], row["idle_answered"] = uvloop.run(idle(server, count))
        row["idle_count"] = count
    finally:
        server.stop()
    row["cold"] = cold_start(spec, args, folder)
    return row


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]], concurrency: list[int]) -> str:
    head = ["server"]
    head += [f"C={c} msg/s" for c in concurrency]
    last = concurrency[-1]
    head += [f"p50 / p99 ms (C={last})"]
    head += [f"server CPU ms / 1,000 msgs (C={c})" for c in concurrency[:2]]
    head += [f"client CPU ms / 1,000 msgs (C={concurrency[:2][-1]})", "KB / idle conn (answered)"]
    head += ["cold start ms", "/run C=1 msg/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["server"]]
        cells += [fmt(row[c]["msgs"]) for c in concurrency]
        cells += [f"{fmt(row[last]['p50'], 2)} / {fmt(row[last]['p99'], 2)}"]
        cells += [fmt(row[c]["cpu"], 1) for c in concurrency[:2]]
        cells += [fmt(row[concurrency[:2][-1]]["client_cpu"], 1)]
        cells += [f"{fmt(row['idle'] * 1.024, 1)} ({row['idle_answered']}/{row['idle_count']})"]
        cells += [fmt(row["cold"]), fmt(row.get("run"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], concurrency: list[int]) -> str:
    """Issue 5's targets against the anchors of this same run."""
    by = {row["server"]: row for row in rows}
    ours, peer, limit = by.get("actionloop-shared"), by.get("websocketd"), by.get("inprocess-echo")
    if not ours or 8 not in concurrency or 1 not in concurrency:
        return ""
    lines = ["| target | measured | verdict |", "| --- | --- | --- |"]

    def add(name: str, value: float, goal: float, ok: bool, unit: str = "") -> None:
        lines.append(f"| {name} | {value:,.2f}{unit} (target {goal:,.2f}{unit}) | {'met' if ok else 'missed'} |")

    if peer:
        for c in (1, 8):
            ratio = ours[c]["cpu"] / peer[c]["cpu"]
            add(f"server CPU per msg vs websocketd, C={c}", ratio, 0.8, ratio <= 0.8, "x")
        ratio = ours[8]["msgs"] / peer[8]["msgs"]
        add("throughput vs websocketd, C=8", ratio, 1.2, ratio >= 1.2, "x")
        if 64 in concurrency:
            add(
                "p99 at C=64 vs websocketd", ours[64]["p99"], peer[64]["p99"], ours[64]["p99"] <= peer[64]["p99"], " ms"
            )
    if limit:
        ratio = ours[8]["msgs"] / limit[8]["msgs"]
        add("throughput vs in-process limit, C=8", ratio, 0.7, ratio >= 0.7, "x")
    add("KB per idle connection", ours["idle"] * 1.024, 20, ours["idle"] * 1.024 <= 20, " KB")
    add("cold start with OW_AUTOINIT", ours["cold"], 300, ours["cold"] < 300, " ms")
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, Linux {platform.release()}"
    )
    pinned = "servers and clients pinned to CPU 0 (taskset / sched_setaffinity)" if args.pin else "not pinned"
    return (
        f"# Benchmark results\n\n"
        f"Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}  \n"
        f"Machine: {machine}; {pinned}  \n"
        f"Command: `{command}`  \n"
        f"Run: {args.duration:g} s per load after {args.warmup:g} s warm-up; closed-loop picows clients in "
        f"{args.client_processes} processes; idle test with {args.idle} connections "
        f"({args.idle_per_process} for servers with a process per connection); cold start: median of "
        f"{args.cold_trials} starts.\n\n"
        f"{table(rows, args.concurrency)}\n\n"
        f"{targets(rows, args.concurrency)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="*", help="subset of servers (default: all available)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--idle", type=int, default=10000, help="idle connections (one process for all)")
    parser.add_argument(
        "--idle-per-process", type=int, default=200, help="idle connections, process-per-connection servers"
    )
    parser.add_argument("--cold-trials", type=int, default=11, help="starts per server; the median is reported")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--out", type=Path, help="write the report here")
    parser.add_argument("--save", action="store_true", help="write bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.concurrency = 0.5, 0.2, [1]
        args.idle, args.idle_per_process, args.cold_trials = 10, 5, 1
    args.pin = args.pin and shutil.which("taskset") is not None and 0 in os.sched_getaffinity(0)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # An image's `pip install` leaves compiled bytecode beside the package; an
    # editable install run with PYTHONDONTWRITEBYTECODE has none, and every
    # start would measure the bytecode compiler.
    compileall.compile_dir(ROOT / "src", quiet=1)
    specs = server_specs(0)
    chosen = args.servers or list(specs)
    missing = [name for name in chosen if name not in specs]
    if missing:
        parser.error(f"unknown or unavailable servers: {missing} (have {list(specs)})")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"actionloop-bench-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in chosen:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(specs[name], args, folder))
    shutil.rmtree(folder, ignore_errors=True)
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, args, command.strip())
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.save:
        # The hand-written analysis below the table survives a new run.
        results = HERE / "RESULTS.md"
        old = results.read_text() if results.exists() else ""
        notes = old[old.index(NOTES) :] if NOTES in old else ""
        results.write_text(text + ("\n" + notes if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
