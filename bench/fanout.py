"""Fan-out: one channel, 10,000 subscribers over 2 replicas, a publish every 100 ms.

    python bench/fanout.py                   # the full run, both sides (a few minutes)
    python bench/fanout.py --quick           # seconds: what the test runs
    python bench/fanout.py --save            # also write the Fan-out section of bench/RESULTS.md

Each side gets its own private redis-server and two replicas, started here:
- actionloop: two `actionloop` processes with OW_WEBSOCKET, OW_API_TOKEN and
  OW_REDIS_URL, auto-initialised with a tiny action that subscribes the
  caller's connection to the channel through `actionloop_api` when a client
  sends `{"subscribe": CHANNEL}`; the publisher POSTs to /channels/bench on
  the first replica's management API.
- socketio: two Node processes (bench/socketio/server.js) joined by
  @socket.io/redis-adapter; a client emits "subscribe" and the server joins
  it to the room; the publisher POSTs to a small HTTP endpoint of the first
  server that calls io.to("bench").emit.

The clients are the same on both sides: picows connections on uvloop in
worker processes, half on each replica (Engine.IO v4 framing spoken by hand
for Socket.IO). The publisher is its own process; every message carries its
send time (CLOCK_MONOTONIC, which all processes share), and each client
records receive time minus send time. The publisher does not wait for one
publish to be answered before the next (open loop), so a server that falls
behind shows it as latency; a message that never comes counts as infinitely
late. Server CPU is read from /proc over both replicas' process trees and
redis-server, over a window of whole publish periods, and divided by the
messages that arrived within that window (counted by arrival time, so a
backlog left for later does not flatter a side).

--layout says where each process runs (taskset, sched_setaffinity), on the
first two CPUs this process may use:
- split (the default): each replica has a CPU of its own, as two pods
  would; Redis shares CPU 0 with replica 1; the clients of each replica run
  on the other replica's CPU, the publisher and this script on CPU 1;
- one-core: both replicas and Redis on CPU 0; clients, publisher and this
  script on CPU 1;
- none: wherever the scheduler puts them.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import datetime
import http.client
import json
import math
import multiprocessing
import os
import platform
import queue as queues
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import cpu_seconds, free_port, percentile  # noqa: E402 - bench/run.py's /proc readers, shared

SOCKETIO = HERE / "socketio"
CHANNEL = "bench"
TOKEN = "fanout-bench-token"
SECTION = "## Fan-out"
NOTES = "### Fan-out notes"
SIDES = ("actionloop", "socketio")
TITLES = {"actionloop": "actionloop", "socketio": "Socket.IO"}
LOGS: dict[int, Path] = {}  # a server's pid: its log

# The action of the actionloop side: subscribes its caller when asked.
ACTION = """\
import os

import actionloop_api


def main(args):
    if "subscribe" in args:
        return {"subscribed": actionloop_api.subscribe(os.environ["__OW_CONNECTION_ID"], args["subscribe"])}
    return {"error": "send {\\"subscribe\\": CHANNEL}"}
"""


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class Placement:
    """The CPU of each process (None: wherever the scheduler puts it)."""

    replicas: tuple[int | None, int | None]
    redis: int | None
    clients: tuple[int | None, int | None]  # the clients of replica 1, of replica 2
    publisher: int | None  # and this script
    text: str


def placement(layout: str, cpus: list[int]) -> Placement:
    if layout == "none" or len(cpus) < 2 or shutil.which("taskset") is None:
        return Placement((None, None), None, (None, None), None, "not pinned")
    a, b = cpus[:2]
    if layout == "one-core":
        text = f"both replicas and Redis pinned to CPU {a}; clients, publisher and this script to CPU {b}"
        return Placement((a, a), a, (b, b), b, text)
    text = (
        f"replica 1 and Redis pinned to CPU {a}, replica 2 to CPU {b}; the clients of each replica on the other "
        f"replica's CPU; the publisher and this script on CPU {b}"
    )
    return Placement((a, b), a, (b, a), b, text)


def spawn(name: str, command: list[str], env: dict[str, str], cpu: int | None, folder: Path) -> subprocess.Popen[bytes]:
    """Start a server in its own session; its stdout and stderr go to NAME.log in the run's folder."""
    prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
    with open(folder / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            prefix + command,  # taskset execs the command: the pid is the server's
            env=env,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    LOGS[process.pid] = folder / f"{name}.log"
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited {process.returncode}: {tail(process)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{process.args} did not listen on {port}: {tail(process)}")


def tail(process: subprocess.Popen[bytes]) -> str:
    """The end of a server's log (spawn's NAME.log), for a failure's message."""
    try:
        return LOGS[process.pid].read_text(errors="replace")[-2000:]
    except (KeyError, OSError):
        return ""


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OW_", "__OW_"))}
    return env | extra


@dataclass
class Side:
    """One side's running servers: what the clients and the publisher need, and what CPU counts."""

    name: str
    redis: subprocess.Popen[bytes]
    replicas: list[subprocess.Popen[bytes]]
    urls: list[str]  # a WebSocket URL per replica
    publish: tuple[int, str]  # the first replica's publish endpoint: port, path
    folder: Path
    versions: str = ""

    def roots(self) -> dict[str, int]:
        names = {f"replica {i + 1}": p.pid for i, p in enumerate(self.replicas)}
        return names | {"Redis": self.redis.pid}

    def stop(self) -> None:
        for process in [*self.replicas, self.redis]:
            stop(process)


def start_redis(cpu: int | None, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("redis-server is not installed")
    command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = spawn("redis", command, clean_env({}), cpu, folder)
    wait_port(port, process)
    return process, port


def start_actionloop(where: Placement, folder: Path) -> Side:
    redis, redis_port = start_redis(where.redis, folder)
    action = folder / "subscribe_action.py"
    action.write_text(ACTION)
    actionloop = str(Path(sys.executable).parent / "actionloop")
    replicas, urls, ports, api_ports = [], [], [], []
    for index in range(2):
        port, api_port = free_port(), free_port()
        env = {"OW_WEBSOCKET": "/ws", "OW_AUTOINIT": str(action), "OW_PORT": str(port), "OW_HOST": "127.0.0.1"}
        env |= {
            "OW_API_TOKEN": TOKEN,
            "OW_API_PORT": str(api_port),
            "OW_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        }
        env |= {"OW_WAIT_FOR_ACK": "1", "OW_WEBSOCKET_MAX_CONNECTIONS": "100000", "HOSTNAME": f"replica{index + 1}"}
        env |= {"OW_ACTION_DIR": str(folder / f"action{index + 1}")}
        replicas.append(spawn(f"replica{index + 1}", [actionloop], clean_env(env), where.replicas[index], folder))
        urls.append(f"ws://127.0.0.1:{port}/ws")
        ports.append(port)
        api_ports.append(api_port)
    for process, port, api_port in zip(replicas, ports, api_ports, strict=True):
        wait_port(port, process)
        wait_port(api_port, process)
        wait_redis_up(port)
    from importlib.metadata import version

    versions = f"actionloop {version('actionloop')}, picows {version('picows')}, redis-py {version('redis')}"
    return Side("actionloop", redis, replicas, urls, (api_ports[0], f"/channels/{CHANNEL}"), folder, versions)


def wait_redis_up(port: int, timeout: float = 30) -> None:
    """Until /readyz says the replica has joined the others through Redis."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/readyz")
            if json.loads(connection.getresponse().read()).get("redis") == "up":
                return
        except (OSError, ValueError):
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    raise RuntimeError("actionloop did not reach Redis")


def start_socketio(where: Placement, folder: Path) -> Side:
    node = shutil.which("node")
    if node is None or not (SOCKETIO / "node_modules" / "socket.io").is_dir():
        raise RuntimeError("the Socket.IO side needs node and `npm ci` in bench/socketio")
    redis, redis_port = start_redis(where.redis, folder)
    replicas, urls, api_ports = [], [], []
    for index in range(2):
        port, api_port = free_port(), free_port()
        command = [
            node,
            str(SOCKETIO / "server.js"),
            str(port),
            str(api_port),
            f"redis://127.0.0.1:{redis_port}",
            TOKEN,
        ]
        env = clean_env({"NODE_ENV": "production"})
        replicas.append(spawn(f"replica{index + 1}", command, env, where.replicas[index], folder))
        urls.append(f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket")
        api_ports.append(api_port)
        wait_port(port, replicas[-1])
        wait_port(api_port, replicas[-1])
    lock = json.loads((SOCKETIO / "package-lock.json").read_text())["packages"]
    pinned = ", ".join(
        f"{name} {lock['node_modules/' + name]['version']}"
        for name in ("socket.io", "@socket.io/redis-adapter", "redis")
    )
    versions = f"Node {subprocess.run([node, '--version'], capture_output=True, text=True, check=False).stdout.strip()}, {pinned}"
    return Side("socketio", redis, replicas, urls, (api_ports[0], f"/channels/{CHANNEL}"), folder, versions)


# ---------------------------------------------------------------- clients


@dataclass
class Tally:
    """What one client process heard: latencies of the measured messages, and what went wrong.

    Concurrent publishes may arrive in either order (the publisher does not
    wait for one answer before the next publish): a reordering is counted,
    not an error; a message a connection already had is a duplicate.
    """

    first: int  # the first measured sequence number
    end: int  # one past the last
    total: int  # publishes in all (warm-up and cool-down included)
    interval: float
    t0: float = 0.0  # when publish 0 is due (CLOCK_MONOTONIC); known before the first arrives
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    by_seq: array.array[int] = field(default_factory=lambda: array.array("q"))  # connections that heard each
    soonest: array.array[float] = field(default_factory=lambda: array.array("d"))  # each publish's first delivery
    # Deliveries by when they arrived: slot k is the publish period around t0 + k * interval,
    # so the CPU of a window of periods is divided by what was delivered in it, backlog or not.
    arrivals: array.array[int] = field(default_factory=lambda: array.array("q"))
    duplicates: int = 0
    reordered: int = 0  # a message older than one its connection already had
    complete: int = 0  # connections that heard every measured message
    dropped: int = 0  # connections that ended before the run did
    stopping: bool = False
    on_complete: Callable[[], None] | None = None

    def record(self, client: Any, seq: int, now: float, sent: float) -> None:
        seen = client.seen
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        slot = int((now - self.t0) / self.interval + 0.5)
        self.arrivals[slot if 0 <= slot < len(self.arrivals) else -1] += 1
        latency = now - sent
        self.by_seq[seq] += 1
        if seq < client.last:
            self.reordered += 1
        else:
            client.last = seq
        if self.first <= seq < self.end:
            self.latencies.append(latency)
            if latency < self.soonest[seq]:
                self.soonest[seq] = latency
            client.heard += 1
            if client.heard == self.end - self.first:
                self.complete += 1
                if self.on_complete is not None and self.complete == client.peers:
                    self.on_complete()


async def clients(
    kind: str, url: str, count: int, tally: Tally, signals: tuple[Any, Any], ready: Callable[[int, float], None]
) -> int:
    """`count` subscribed connections until `stop` is set; the number that failed to subscribe.

    `signals`: the time publish 0 is due (0 until the publisher is started), and the stop event.
    """
    start, stop = signals
    from orjson import loads
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    loop = asyncio.get_running_loop()
    text = WSMsgType.TEXT
    clock = time.monotonic

    class ActionloopClient(WSListener):
        """Sends `{"subscribe": "bench"}`; the action's reply says it is in; then the channel's messages."""

        peers = count
        last = heard = 0

        def on_ws_connected(self, transport: WSTransport) -> None:
            self.subscribed = loop.create_future()
            self.seen = bytearray(tally.total)
            transport.send(text, b'{"subscribe": "' + CHANNEL.encode() + b'"}')

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            tally.dropped += not tally.stopping

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            now = clock()
            if frame.msg_type is not text:
                return
            message = loads(frame.get_payload_as_bytes())
            seq = message.get("seq")
            if seq is not None:
                tally.record(self, seq, now, message["t"])
            elif not self.subscribed.done():
                self.subscribed.set_result(message.get("subscribed") is True)

    class SocketIOClient(WSListener):
        """Engine.IO v4 over a WebSocket: open, connect to `/`, emit subscribe with an ack, answer pings."""

        peers = count
        last = heard = 0

        def on_ws_connected(self, transport: WSTransport) -> None:
            self.subscribed = loop.create_future()
            self.seen = bytearray(tally.total)

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            tally.dropped += not tally.stopping

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            now = clock()
            if frame.msg_type is not text:
                return
            payload = frame.get_payload_as_bytes()
            if payload.startswith(b'42["message",'):
                message = loads(payload[13:-1])
                tally.record(self, message["seq"], now, message["t"])
            elif payload == b"2":  # Engine.IO ping
                transport.send(text, b"3")
            elif payload.startswith(b"0{"):  # Engine.IO open: connect to the main namespace
                transport.send(text, b"40")
            elif payload.startswith(b"40"):  # Socket.IO connected: join the room, ack id 0
                transport.send(text, b'420["subscribe","' + CHANNEL.encode() + b'"]')
            elif payload.startswith(b"430") and not self.subscribed.done():
                self.subscribed.set_result(b'"subscribed":true' in payload)

    factory = ActionloopClient if kind == "actionloop" else SocketIOClient
    gate = asyncio.Semaphore(32)
    transports: list[WSTransport] = []

    async def one() -> bool:
        async with gate:
            for attempt in range(5):
                try:
                    transport, listener = await ws_connect(factory, url, read_buffer_init_size=2048)
                    break
                except (OSError, TimeoutError, RuntimeError):
                    if attempt == 4:
                        return False
                    await asyncio.sleep(0.2 * (attempt + 1))
            transports.append(transport)
            try:
                return bool(await asyncio.wait_for(listener.subscribed, 120))
            except TimeoutError:
                return False

    started = time.monotonic()
    subscribed = await asyncio.gather(*(one() for _ in range(count)))
    failed = subscribed.count(False)
    ready(failed, time.monotonic() - started)
    while not stop.is_set():
        tally.t0 = tally.t0 or start.value
        await asyncio.sleep(0.05)
    tally.stopping = True
    for transport in transports:
        transport.disconnect()
    return failed


def client_worker(
    kind: str, url: str, count: int, schedule: tuple[int, int, int, float], cpu: int | None, queue: Any, signals: Any
) -> None:
    """One client process: `schedule` is (first measured, end of measured, all publishes, interval)."""
    import uvloop

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    me = os.getpid()
    tally = Tally(*schedule, on_complete=lambda: queue.put(("complete", me, None)))
    tally.by_seq.extend([0] * tally.total)
    tally.soonest.extend([math.inf] * tally.total)
    tally.arrivals.extend([0] * (tally.total + 1))

    def ready(failed: int, seconds: float) -> None:
        queue.put(("ready", me, (failed, seconds)))

    failed = uvloop.run(clients(kind, url, count, tally, signals, ready))
    heard = (tally.latencies, tally.by_seq, tally.soonest, tally.arrivals)
    queue.put(("result", me, (url, count, failed, heard, tally.duplicates, tally.reordered, tally.dropped)))


def publisher(port: int, path: str, t0: float, interval: float, total: int, cpu: int | None, queue: Any) -> None:
    """POST `{"seq": k, "t": send time}` at `t0 + k * interval`: open loop, see `publish_on_schedule`."""
    import uvloop

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    round_trips, lags, errors = uvloop.run(publish_on_schedule(port, path, t0, interval, total))
    queue.put(("published", os.getpid(), (total, sorted(round_trips), sorted(lags), errors)))


async def publish_on_schedule(
    port: int, path: str, t0: float, interval: float, total: int
) -> tuple[list[float], list[float], list[str]]:
    """Each publish leaves at its time, answered or not the one before (kept-alive connections, as many as needed).

    A publisher that waited for each answer would slow down with the
    server and hide its backlog; this one does not. What it reports: the
    round trip of each request, how late each left (its own lag: a sign
    that the publisher's CPU was taken), and any answer but 200.
    """
    import aiohttp

    url = f"http://127.0.0.1:{port}{path}"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    round_trips: list[float] = []
    lags: list[float] = []
    errors: list[str] = []

    async def one(session: aiohttp.ClientSession, seq: int) -> None:
        sent = time.monotonic()
        lags.append(sent - (t0 + seq * interval))
        try:
            async with session.post(url, data=b'{"seq": %d, "t": %.6f}' % (seq, sent), headers=headers) as response:
                body = await response.read()
        except (aiohttp.ClientError, OSError) as exc:  # its messages will be missing: the report says so
            errors.append(f"publish {seq}: {exc!r}")
            return
        round_trips.append(time.monotonic() - sent)
        if response.status != 200:
            errors.append(f"publish {seq}: {response.status} {body[:200]!r}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sending = []
        for seq in range(total):
            await asyncio.sleep(max(0.0, t0 + seq * interval - time.monotonic()))
            sending.append(asyncio.ensure_future(one(session, seq)))
        await asyncio.gather(*sending)
    return round_trips, lags, errors


# ---------------------------------------------------------------- one side


def cpu_by_core() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each CPU, from /proc/stat."""
    cores = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            ticks = [int(x) for x in line.split()[1:]]
            idle = ticks[3] + ticks[4]
            cores.append((sum(ticks[:8]) - idle, sum(ticks[:8])))
    return cores


@dataclass
class Snapshot:
    """CPU seconds so far: each server root's tree, the clients and publisher, and each CPU's (busy, total)."""

    server: dict[str, float]
    clients: float
    cores: list[tuple[int, int]]

    @classmethod
    def take(cls, roots: dict[str, int], clients: list[int]) -> Snapshot:
        return cls(
            {name: cpu_seconds(pid) for name, pid in roots.items()}, sum(map(cpu_seconds, clients)), cpu_by_core()
        )


def start_clients(
    side: Side, args: argparse.Namespace, schedule: tuple[int, int, int, float], queue: Any, signals: Any
) -> tuple[list[multiprocessing.Process], int, float]:
    """Client processes, half on each replica, once every connection is subscribed: (processes, failures, seconds)."""
    shares = [args.connections // args.client_processes] * args.client_processes
    for i in range(args.connections % args.client_processes):
        shares[i] += 1
    workers = [
        multiprocessing.Process(
            target=client_worker,
            args=(side.name, side.urls[i % 2], n, schedule, args.where.clients[i % 2], queue, signals),
        )
        for i, n in enumerate(shares)
    ]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    pending = {worker.pid for worker in workers}
    failed = 0
    while pending:
        kind, pid, value = queue.get(timeout=600)
        if kind == "ready":
            pending.discard(pid)
            failed += value[0]
    return workers, failed, time.monotonic() - started


def collect(
    queue: Any, workers: list[multiprocessing.Process], publishing: multiprocessing.Process, stop: Any, deadline: float
) -> tuple[Any, list[Any]]:
    """Wait for the publisher and for every client to hear every measured publish (or the deadline); then stop."""
    published, complete = None, set()
    while (published is None and publishing.exitcode is None) or len(complete) < len(workers):
        try:
            kind, pid, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
        except queues.Empty:  # what is missing by now counts as never delivered
            break
        if kind == "published":
            published = value
        elif kind == "complete":
            complete.add(pid)
    stop.set()
    results = []
    while len(results) < len(workers) or published is None:
        if published is None and publishing.exitcode not in (None, 0):
            raise RuntimeError(f"the publisher failed (exit code {publishing.exitcode})")
        kind, pid, value = queue.get(timeout=120)
        if kind == "result":
            results.append(value)
        elif kind == "published":
            published = value
    for worker in workers:
        worker.join(30)
    return published, results


def measure(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    """Connect and subscribe every client, publish, and take the figures of the measured window."""
    warm, measured, cool, interval = args.warmup_publishes, args.publishes, args.cooldown_publishes, args.interval
    first, end, total = warm, warm + measured, warm + measured + cool
    queue: multiprocessing.Queue[Any] = multiprocessing.Queue()
    stop, start = multiprocessing.Event(), multiprocessing.Value("d", 0.0)
    workers, failed, setup = start_clients(side, args, (first, end, total, interval), queue, (start, stop))
    time.sleep(args.settle)

    t0 = start.value = time.monotonic() + 0.5
    publishing = multiprocessing.Process(
        target=publisher, args=(*side.publish, t0, interval, total, args.where.publisher, queue)
    )
    publishing.start()
    roots, clients = side.roots(), [p.pid for p in [*workers, publishing] if p.pid]
    # The window: whole publish periods, from half a period before the first measured publish.
    time.sleep(max(0.0, t0 + (first - 0.5) * interval - time.monotonic()))
    before, load = Snapshot.take(roots, clients), os.getloadavg()[0]
    time.sleep(max(0.0, t0 + (end - 0.5) * interval - time.monotonic()))
    after = Snapshot.take(roots, clients)
    published, results = collect(queue, workers, publishing, stop, t0 + total * interval + args.drain)
    load = (load, os.getloadavg()[0])
    publishing.join(30)
    row = figures(side, args, (first, end), published, results)
    window = measured * interval
    server = {name: after.server[name] - before.server[name] for name in roots}
    per = 1e6 / row["delivered_in_window"] if row["delivered_in_window"] else math.nan
    return row | {
        "setup_s": setup,
        "subscribed": args.connections - failed,
        "server_cpu_us": sum(server.values()) * per,
        "server_cpu_split_us": {name: seconds * per for name, seconds in server.items()},
        "server_cpu_share": {name: seconds / window for name, seconds in server.items()},
        "client_cpu_us": (after.clients - before.clients) * per,
        "cores_busy": [(b[0] - a[0]) / max(1, b[1] - a[1]) for a, b in zip(before.cores, after.cores, strict=True)],
        "load": load,
    }


def figures(
    side: Side, args: argparse.Namespace, measured: tuple[int, int], published: Any, results: list[Any]
) -> dict[str, Any]:
    """Deliveries and latencies of the measured publishes, from what the clients heard."""
    first, end = measured
    latencies = sorted(x for r in results for x in r[3][0])
    expected = (end - first) * args.connections
    on = {url: [r for r in results if r[0] == url] for url in side.urls}  # the first replica is the one published to
    return {
        "side": side.name,
        "versions": side.versions,
        "connections": args.connections,
        "publishes": end - first,
        "expected": expected,
        "delivered": len(latencies),
        "missing": expected - len(latencies),
        "duplicates": sum(r[4] for r in results),
        "reordered": sum(r[5] for r in results),
        "dropped": sum(r[6] for r in results),
        "missing_by_seq": [  # per replica, the measured publishes some of its connections did not hear
            {seq: n for seq in range(first, end) if (n := sum(r[1] - r[3][1][seq] for r in rs))} for rs in on.values()
        ],
        "p50_ms": of_expected(latencies, expected, 50) * 1000,
        "p90_ms": of_expected(latencies, expected, 90) * 1000,
        "p99_ms": of_expected(latencies, expected, 99) * 1000,
        "max_ms": of_expected(latencies, expected, 100) * 1000,
        "p99_by_replica_ms": [
            of_expected(sorted(x for r in rs for x in r[3][0]), (end - first) * sum(r[1] for r in rs), 99) * 1000
            for rs in on.values()
        ],
        "first_delivery_ms": [  # per replica, the median over publishes of its first connection's wait
            percentile(sorted(min(r[3][2][seq] for r in rs) for seq in range(first, end)), 50) * 1000
            for rs in on.values()
        ],
        "delivered_in_window": sum(sum(r[3][3][first:end]) for r in results),
        "publish_rtt_ms": percentile(published[1], 50) * 1000,
        "publish_lag_ms": (percentile(published[2], 99) * 1000, published[2][-1] * 1000),
        "publish_errors": published[3],
    }


def run_side(name: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"actionloop-fanout-{os.getpid()}-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    start = start_actionloop if name == "actionloop" else start_socketio
    side = start(args.where, folder)
    try:
        return measure(side, args)
    finally:
        side.stop()
        if args.keep:
            print(f"{name}: the servers' logs are in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the report


def of_expected(latencies: list[float], expected: int, pct: float) -> float:
    """A percentile over every expected delivery, a missing one counting as infinitely late."""
    if not expected:
        return float("nan")
    index = min(expected - 1, int(expected * pct / 100))
    return latencies[index] if index < len(latencies) else math.inf


def fmt(value: float, digits: int = 0) -> str:
    if math.isinf(value):
        return "never"
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def line(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(row) for row in rows) + " |"

    lines = [
        "| | " + " | ".join(TITLES[row["side"]] for row in rows) + " |",
        "| --- |" + " --- |" * len(rows),
        line("subscribed / connections", lambda r: f"{r['subscribed']:,} / {r['connections']:,}"),
        line(
            f"delivered within {args.drain:g} s of the last publish / expected (missing)",
            lambda r: f"{r['delivered']:,} / {r['expected']:,} ({r['missing']:,})",
        ),
        line(
            "duplicates; reordered; connections dropped",
            lambda r: f"{r['duplicates']:,}; {r['reordered']:,}; {r['dropped']:,}",
        ),
        line(
            "latency p50 / p90 / p99 / max, ms (never: missing)",
            lambda r: " / ".join(fmt(r[k], 1) for k in LATENCY_KEYS),
        ),
        line(
            "p99 on the replica published to / the other, ms",
            lambda r: " / ".join(fmt(x, 1) for x in r["p99_by_replica_ms"]),
        ),
        line(
            "a publish's first delivery p50, replica 1 / replica 2, ms",
            lambda r: " / ".join(fmt(x, 1) for x in r["first_delivery_ms"]),
        ),
        line("messages delivered in the CPU window", lambda r: f"{r['delivered_in_window']:,}"),
        line("server CPU per delivered message, µs (2 replicas + Redis)", lambda r: fmt(r["server_cpu_us"], 2)),
        line(
            "of which replica 1 / replica 2 / Redis, µs",
            lambda r: " / ".join(fmt(x, 2) for x in r["server_cpu_split_us"].values()),
        ),
        line(
            "server CPU, share of a core: replica 1 / replica 2 / Redis",
            lambda r: " / ".join(f"{x:.0%}" for x in r["server_cpu_share"].values()),
        ),
        line("client CPU per delivered message, µs (clients + publisher)", lambda r: fmt(r["client_cpu_us"], 2)),
        line(
            "publish request round trip p50, ms; the publisher's own lag p99 / max, ms",
            lambda r: f"{fmt(r['publish_rtt_ms'], 1)}; " + " / ".join(fmt(x, 1) for x in r["publish_lag_ms"]),
        ),
        line("failed publish requests", lambda r: f"{len(r['publish_errors']):,}"),
        line("connect + subscribe, s", lambda r: fmt(r["setup_s"], 1)),
        line(
            "busy CPU 0 / CPU 1 in the window (everything)", lambda r: " / ".join(f"{x:.0%}" for x in r["cores_busy"])
        ),
        line(
            "load average (1 min) at the window's start / after the drain",
            lambda r: "{:.2f} / {:.2f}".format(*r["load"]),
        ),
    ]
    return "\n".join(lines)


LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "max_ms")


def verdicts(rows: list[dict[str, Any]]) -> str:
    by = {row["side"]: row for row in rows}
    ours, peer = by.get("actionloop"), by.get("socketio")
    if ours is None or peer is None:
        return ""
    lines = ["| goal | actionloop | Socket.IO | verdict |", "| --- | --- | --- | --- |"]
    for label, key, unit in (("p99 latency", "p99_ms", " ms"), ("server CPU per delivery", "server_cpu_us", " µs")):
        # A missing message is infinitely late, so p99 says when more than 1% never came.
        ok = math.isfinite(ours[key]) and ours[key] <= peer[key]
        ratio = ours[key] / peer[key] if math.isfinite(peer[key]) and peer[key] else math.nan
        mine, theirs = (fmt(x, 2) + ("" if math.isinf(x) else unit) for x in (ours[key], peer[key]))
        mine += "" if math.isnan(ratio) else f" ({ratio:.2f}x)"
        lines.append(f"| {label} no worse than Socket.IO's | {mine} | {theirs} | {'met' if ok else 'missed'} |")
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, Linux {platform.release()}"
    )
    versions = "; ".join(f"{TITLES[row['side']]}: {row['versions']}" for row in rows)
    per_replica = args.connections // 2
    return (
        f"{SECTION}\n\n"
        f"Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}  \n"
        f"Machine: {machine}; {args.where.text}  \n"
        f"Command: `{command}`  \n"
        f"Run: {args.connections:,} connections subscribed to one channel, {per_replica:,} on each of 2 replicas "
        f"sharing one private redis-server, from {args.client_processes} picows client processes; one publish every "
        f"{args.interval * 1000:g} ms to the first replica; {args.warmup_publishes} warm-up publishes, then "
        f"{args.publishes} measured ({args.publishes * args.interval:g} s) whose latencies and deliveries are "
        f"counted; CPU over exactly those {args.publishes} publish periods, per message delivered in them.  \n"
        f"Versions: {versions}\n\n"
        f"{table(rows, args)}\n\n"
        f"{verdicts(rows)}\n"
    )


def save(text: str, results: Path) -> None:
    """Replace the Fan-out section of `results` (or append it); its notes and the rest of the file stay.

    The section runs from its `## Fan-out` line to the next `## ` heading;
    what follows its `### Fan-out notes` line is written by hand and kept.
    """
    old = results.read_text() if results.exists() else ""
    before, after, notes = old, "", ""
    heading = re.search(rf"^{re.escape(SECTION)}$", old, re.M)
    if heading is not None:
        following = re.search(r"^## ", old[heading.end() :], re.M)
        end = len(old) if following is None else heading.end() + following.start()
        before, section, after = old[: heading.start()], old[heading.start() : end], old[end:]
        kept = re.search(rf"^{re.escape(NOTES)}$", section, re.M)
        notes = "" if kept is None else section[kept.start() :].rstrip("\n") + "\n"
    before = before.rstrip("\n") + "\n\n" if before.strip() else ""
    body = text.rstrip("\n") + "\n" + ("\n" + notes if notes else "")
    results.write_text(before + body + ("\n" + after if after else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", nargs="*", choices=SIDES, default=list(SIDES))
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--client-processes", type=int, default=4, help="half on each replica")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between publishes")
    parser.add_argument("--publishes", type=int, default=300, help="measured publishes")
    parser.add_argument("--warmup-publishes", type=int, default=20)
    parser.add_argument("--cooldown-publishes", type=int, default=10, help="after the window, keeping it steady")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between subscribing and publishing")
    parser.add_argument("--drain", type=float, default=30.0, help="how long stragglers may take after the last")
    parser.add_argument("--layout", choices=("split", "one-core", "none"), default="split", help="see above")
    parser.add_argument("--keep", action="store_true", help="keep the servers' folders and logs")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--out", type=Path, help="write the report here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--save", action="store_true", help="write the Fan-out section of bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.client_processes, args.publishes = 200, 2, 20
        args.warmup_publishes, args.cooldown_publishes, args.settle, args.drain = 5, 3, 0.5, 5.0
    if args.client_processes % 2:
        parser.error("--client-processes must be even: half go to each replica")
    args.where = placement(args.layout, sorted(os.sched_getaffinity(0)))
    if args.where.publisher is not None:
        os.sched_setaffinity(0, {args.where.publisher})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections // 2 + 1000:  # a replica holds half the connections
        parser.error(f"RLIMIT_NOFILE's hard limit {hard} is too low for {args.connections} connections")
    rows = []
    for name in args.sides:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(run_side(name, args))
    command = "python bench/fanout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, args, command.strip())
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.save:
        save(text, HERE / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
