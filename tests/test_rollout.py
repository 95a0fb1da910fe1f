"""Rollouts that lose nothing (README: Shutdown, Clients that lose nothing).

Two replicas, real `actionloop` processes started as the generated pod spec
says (deploy_helpers.Pod), run the same action behind a real nginx set up as
the Ingress proxies WebSockets, with both replicas as its upstream servers.
Ten clients, each the README's ReconnectingClient (read from the README
itself), send a numbered message every 50 ms, and new clients keep arriving,
while replica 1 is replaced the way a Deployment's rolling update does it
with two replicas (maxSurge 1, maxUnavailable 0): a new pod starts, and once
it is ready the old one gets SIGTERM.

The test plays Kubernetes' endpoints machinery. It probes each pod's /readyz
every PROBE seconds (the endpoints controller learning of a pod's readiness,
or of its deletion), and puts each change into nginx's upstream list
PROPAGATION seconds later by a reload (the EndpointSlice update reaching the
ingress controller and kube-proxy). So the replacement is a new port added to
nginx once it is ready, not a server listed in advance, and the old pod stays
listed for a while after its SIGTERM, as it does in a cluster.

nginx plays either balancer (BALANCERS). Like ingress-nginx, it tries a
failed connect on the next server (`proxy_next_upstream error timeout`, 3
tries) and marks the server failed for 10 s (nginx's own `max_fails=1
fail_timeout=10s`). Like kube-proxy, it passes the failure to the client
(as a 502) and marks nothing.

Counted: messages sent, answered (each once) and lost; messages the action
ran twice or never (from the pods' logs); connection attempts refused or
failed, as the clients saw them; connections the old replica took after its
SIGTERM; and connects nginx saw refused by a replica. The same rollout with
OW_DRAIN_DELAY=0 shows what the delay buys. Further down: the README's
client and the demo page (in Chromium) send again what the drain dropped.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TIME_FACTOR
from deploy_helpers import BALANCERS, CHROMIUM_ARGS, Nginx, Pod, browser_home, generate, need

from actionloop.config import Config

PATH = "/hello"
CLIENTS = 10
INTERVAL = 0.05  # each client sends a message this often
NEWCOMER_INTERVAL = 0.1  # a new client arrives this often during the rollout
PROBE = 0.2  # s between readiness probes of each pod
PROPAGATION = 1.0  # s from a readiness change to nginx's upstream list
SETTLE = 20 * TIME_FACTOR

# The action: echoes the message with the connection it came on (the
# connection id starts with the pod's HOSTNAME), and logs what it ran.
# The demo page's messages ({"name": ...}) take 1 s, so that some wait
# at the server when the drain comes.
ACTION = """\
import os, time

def main(args):
    if "name" in args:
        time.sleep(1)
    print("ran", args.get("client"), args.get("id"), args.get("name"), flush=True)
    return {**args, "connection": os.environ["__OW_CONNECTION_ID"]}
"""
RAN = re.compile(r"^ran (\d+) (\d+) None$", re.MULTILINE)
REPLICAS = ("replica-1", "replica-2", "replica-3")


def replica_of(connection: str) -> str:
    """The pod a connection id names: ids start with the pod's HOSTNAME (hub.py)."""
    return next((name for name in REPLICAS if connection.startswith(name + "-")), "")


def reconnecting_client() -> Any:
    """The README's ReconnectingClient, run from the README's own text."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Clients that lose nothing") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```\n")]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace["ReconnectingClient"]


Client = reconnecting_client()


async def ready(port: int) -> bool:
    """One readiness probe: GET /readyz answers 200."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 1)
        return status.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


class Endpoints:
    """Kubernetes' endpoints, played: the ready pods reach nginx PROPAGATION s after they change."""

    def __init__(self, pods: dict[str, Pod], balancer: Nginx) -> None:
        self.pods = pods
        self.balancer = balancer
        self.seen = sorted(pods)
        self.changes = [(time.time(), self.seen)]  # when nginx got which list
        self.tasks: set[asyncio.Task[None]] = set()

    async def watch(self) -> None:
        while True:
            probes = {name: ready(pod.port) for name, pod in list(self.pods.items())}
            results = dict(zip(probes, await asyncio.gather(*probes.values()), strict=True))
            now = sorted(name for name, up in results.items() if up)
            if now and now != self.seen:
                self.seen = now
                task = asyncio.create_task(self.propagate(now))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(PROBE)

    async def propagate(self, names: list[str]) -> None:
        await asyncio.sleep(PROPAGATION)
        await asyncio.to_thread(self.balancer.reload, [self.pods[name].port for name in names])
        self.changes.append((time.time(), names))

    @property
    def listed(self) -> list[str]:
        """What nginx has now."""
        return self.changes[-1][1]


@dataclass
class Counts:
    sent: int = 0  # messages the steady clients sent (distinct numbers)
    answered: int = 0  # of those, answered: each counted once
    lost: int = 0  # sent, never answered
    ran_twice: int = 0  # messages the action ran more than once (the pods' logs)
    never_ran: int = 0  # messages the action never ran
    reconnects: int = 0  # steady clients' connections after their first
    refused: int = 0  # connection attempts refused or failed, as clients saw them
    newcomers: int = 0  # clients that connected during the rollout, one message each
    newcomers_answered: int = 0
    taken_while_leaving: int = 0  # connections the old replica took after its SIGTERM
    upstream_refused: int = 0  # connects nginx saw refused by a replica (and retried elsewhere)
    upstream_errors: int = 0  # any upstream error nginx logged
    on_old: int = 0  # steady clients on the old replica at its SIGTERM
    on_old_after: int = 0  # ... and when it was gone
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)


class Steady:
    """One of the ten clients: a numbered message every INTERVAL, through the README's pattern."""

    def __init__(self, url: str, number: int) -> None:
        self.number = number
        self.client = Client(url, self.on_reply)
        self.sent = 0
        self.answered: collections.Counter[int] = collections.Counter()
        self.connections: list[str] = []

    def on_reply(self, reply: dict[str, Any]) -> None:
        assert reply["client"] == self.number, reply  # never another client's reply
        self.answered[reply["id"]] += 1
        if not self.connections or self.connections[-1] != reply["connection"]:
            self.connections.append(reply["connection"])

    async def send_every(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sent += 1
            await self.client.send({"id": self.sent, "client": self.number})
            await asyncio.sleep(INTERVAL)

    @property
    def replica(self) -> str:
        return replica_of(self.connections[-1]) if self.connections else ""


async def newcomer(url: str, number: int, served_by: list[tuple[float, str]]) -> tuple[int, bool]:
    """A client that arrives, sends one message, waits for its reply and leaves: (failed attempts, answered)."""
    answered = asyncio.Event()

    def on_reply(reply: dict[str, Any]) -> None:
        served_by.append((time.time(), reply["connection"]))
        answered.set()

    client = Client(url, on_reply)
    task = asyncio.create_task(client.run())
    await client.send({"id": 1, "client": number})
    try:
        await asyncio.wait_for(answered.wait(), SETTLE)
    except TimeoutError:
        pass
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return client.failed, answered.is_set()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.05)


async def in_thread(call: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(call)


async def rollout(tmp_path: Path, env: dict[str, str], kind: str) -> Counts:
    """Replace replica-1 by replica-3 under load; what was counted."""
    action = tmp_path / "echo.py"
    action.write_text(ACTION)
    docs = generate(action, "--name", "hello", "--path", PATH)
    pods: dict[str, Pod] = {}
    tasks: list[asyncio.Task[Any]] = []
    balancer: Nginx | None = None
    counts = Counts()
    sigterm = 0.0

    def start(name: str) -> Pod:
        # HOSTNAME is the pod's name in a cluster; connection ids start with it.
        pods[name] = Pod(docs, tmp_path / name, HOSTNAME=name, **env)
        return pods[name].wait_ready()

    try:
        await in_thread(lambda: start("replica-1"))
        await in_thread(lambda: start("replica-2"))
        balancer = Nginx(docs["Ingress"], [pods[n].port for n in sorted(pods)], tmp_path / "nginx", kind=kind)
        endpoints = Endpoints(pods, balancer)
        tasks.append(asyncio.create_task(endpoints.watch()))
        url = f"ws://127.0.0.1:{balancer.port}{PATH}"
        clients = [Steady(url, number) for number in range(CLIENTS)]
        stop_sending = asyncio.Event()
        for steady in clients:
            tasks.append(asyncio.create_task(steady.client.run()))
            tasks.append(asyncio.create_task(steady.send_every(stop_sending)))
        await until(lambda: all(c.connections for c in clients), SETTLE, "the clients did not connect")
        await asyncio.sleep(1)

        # The rolling update: a new pod; once it is ready, SIGTERM to the old one.
        await in_thread(lambda: start("replica-3"))
        old = pods["replica-1"]
        counts.on_old = sum(c.replica == "replica-1" for c in clients)
        sigterm = time.time()
        old.process.send_signal(signal.SIGTERM)
        served_by: list[tuple[float, str]] = []
        arrivals: list[asyncio.Task[tuple[int, bool]]] = []

        async def arrive() -> None:
            while not stop_sending.is_set():
                arrivals.append(asyncio.create_task(newcomer(url, 1000 + len(arrivals), served_by)))
                await asyncio.sleep(NEWCOMER_INTERVAL)

        tasks.append(asyncio.create_task(arrive()))
        counts.exit_code = await in_thread(lambda: old.process.wait(old.grace * TIME_FACTOR))
        counts.notes.append(f"replica-1 exited {time.time() - sigterm:.1f} s after SIGTERM")
        # The rollout is over once nginx no longer lists the old pod; a second more.
        await until(lambda: "replica-1" not in endpoints.listed, SETTLE, "replica-1 stayed in nginx")
        await asyncio.sleep(1)
        stop_sending.set()
        await until(lambda: all(not c.client.unanswered for c in clients), SETTLE, "messages left unanswered")
        for result in await asyncio.gather(*arrivals):
            counts.newcomers += 1
            counts.refused += result[0]
            counts.newcomers_answered += result[1]
        counts.on_old_after = sum(c.replica == "replica-1" for c in clients)
        for c in clients:
            counts.sent += c.sent
            counts.answered += len(c.answered)
            counts.lost += c.sent - len(c.answered)
            counts.reconnects += len(set(c.connections)) - 1
            counts.refused += c.client.failed
        counts.notes.append(
            "nginx upstreams: " + ", ".join(f"{t - sigterm:+.1f} s {names}" for t, names in endpoints.changes)
        )
        counts.notes.append(f"newcomers served by replica-1 after SIGTERM: {served_after(served_by, sigterm)}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await in_thread(lambda: stop_all(pods, balancer))
    count_logs(counts, pods, balancer, sigterm)
    return counts


def served_after(served_by: list[tuple[float, str]], since: float) -> int:
    return sum(when >= since and replica_of(connection) == "replica-1" for when, connection in served_by)


def stop_all(pods: dict[str, Pod], balancer: Nginx | None) -> None:
    for pod in pods.values():  # all at once; the second SIGTERM of stop() ends the delay
        if pod.process.poll() is None:
            pod.process.send_signal(signal.SIGTERM)
    for pod in pods.values():
        pod.stop()
    if balancer is not None:
        balancer.stop()


def count_logs(counts: Counts, pods: dict[str, Pod], balancer: Nginx | None, sigterm: float) -> None:
    """What the pods' and nginx's logs say."""
    ran: collections.Counter[tuple[int, int]] = collections.Counter()
    for pod in pods.values():
        ran.update((int(c), int(n)) for c, n in RAN.findall(pod.logs()) if int(c) < CLIENTS)
    counts.ran_twice = sum(times > 1 for times in ran.values())
    counts.never_ran = counts.sent - len(ran)
    if "replica-1" in pods:
        for line in pods["replica-1"].logs().splitlines():
            if '"event":"websocket_open"' in line and json.loads(line)["time"] >= sigterm:
                counts.taken_while_leaving += 1
    if balancer is not None:
        counts.upstream_refused = balancer.refused_upstream()
        counts.upstream_errors = len(balancer.upstream_errors())


def scenario(tmp_path: Path, env: dict[str, str], kind: str) -> Counts:
    counts = asyncio.run(rollout(tmp_path, env, kind))
    print(f"\nrollout behind {kind}, {env or 'the manifest env'}: {counts}")
    return counts


def test_grace_period_covers_the_whole_shutdown() -> None:
    """The manifest's terminationGracePeriodSeconds exceeds delay + drain + 1 + stop grace (README: Shutdown)."""
    docs = generate(ROOT / "examples" / "hello.py", "--name", "hello")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"]}
    config = Config()
    delay = float(env.get("OW_DRAIN_DELAY", config.drain_delay))
    drain = float(env.get("OW_DRAIN_TIMEOUT", config.drain_timeout))
    stop = float(env.get("OW_STOP_GRACE", config.stop_grace))
    assert delay == 5 and pod["terminationGracePeriodSeconds"] > delay + drain + 1 + stop


def test_connections_taken_during_the_delay(start_server: Any) -> None:
    """After SIGTERM: /readyz 503 at once; WebSockets and HTTP still served for OW_DRAIN_DELAY; then 1001, port closed."""
    hello = str(ROOT / "examples" / "hello.py")
    server = start_server({"OW_WEBSOCKET": PATH, "OW_AUTOINIT": hello, "OW_DRAIN_DELAY": "2"})
    asyncio.run(during_the_delay(server.port, server.process))
    assert server.process.wait(10 * TIME_FACTOR) == 0


async def during_the_delay(port: int, process: subprocess.Popen[bytes]) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedOK

    url = f"ws://127.0.0.1:{port}{PATH}"
    await until_ready(port)
    async with connect(url) as before:
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await until_not_ready(port)
        assert time.monotonic() - signalled < 1
        async with connect(url) as during:  # a handshake after SIGTERM: accepted
            await during.send(json.dumps({"name": "during"}))
            assert json.loads(await during.recv()) == {"greeting": "Hello, during!"}
            await before.send(json.dumps({"name": "before"}))
            assert json.loads(await before.recv()) == {"greeting": "Hello, before!"}
            for ws in (before, during):
                with pytest.raises(ConnectionClosedOK) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert 1.5 < time.monotonic() - signalled < 2 + 3 * TIME_FACTOR
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def until_ready(port: int) -> None:
    await until_probe(port, True)


async def until_not_ready(port: int) -> None:
    await until_probe(port, False)


async def until_probe(port: int, wanted: bool) -> None:
    deadline = time.monotonic() + 10 * TIME_FACTOR
    while await ready(port) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz never {'ready' if wanted else 'failing'}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", sorted(BALANCERS))
def test_rollout_loses_nothing(tmp_path: Path, kind: str) -> None:
    """Replica 1 replaced under load, with the manifest's OW_DRAIN_DELAY: nothing lost or run twice, no attempt refused."""
    counts = scenario(tmp_path, {}, kind)
    assert counts.exit_code == 0
    assert counts.on_old > 0 and counts.on_old_after == 0  # clients did move
    assert counts.sent > CLIENTS * 50 and counts.answered == counts.sent and counts.lost == 0
    assert counts.ran_twice == 0 and counts.never_ran == 0
    assert counts.refused == 0 and counts.newcomers_answered == counts.newcomers > 0, counts
    # Replica 1 took the new connections nginx still sent it after its
    # SIGTERM, and nginx never met its port closed.
    assert counts.taken_while_leaving > 0
    assert counts.upstream_refused == 0 and counts.upstream_errors == 0, counts


@pytest.mark.parametrize("kind", sorted(BALANCERS))
def test_rollout_without_the_delay(tmp_path: Path, kind: str) -> None:
    """The same with OW_DRAIN_DELAY=0: the port closes while the balancer still sends to it."""
    counts = scenario(tmp_path, {"OW_DRAIN_DELAY": "0"}, kind)
    assert counts.exit_code == 0
    # The README's client still loses nothing: it tries again.
    assert counts.lost == 0 and counts.ran_twice == 0 and counts.newcomers_answered == counts.newcomers
    if kind == "ingress":
        # Every refused connect was tried on another server: only nginx saw them.
        assert counts.refused == 0 and counts.upstream_refused > 0, counts
    else:
        # Without a retry, the clients see them (502 from the stand-in).
        assert counts.refused > 0, counts


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    """Two replicas without the delay (no endpoints to wait for: the ingress's
    retry takes a refused connect to the other) behind the ingress stand-in."""
    action = tmp_path / "echo.py"
    action.write_text(ACTION)
    docs = generate(action, "--name", "hello", "--path", PATH, "--demo")
    pods: dict[str, Pod] = {}
    balancer = None
    try:
        for name in ("replica-1", "replica-2"):
            pods[name] = Pod(docs, tmp_path / name, HOSTNAME=name, OW_DRAIN_DELAY="0").wait_ready()
        balancer = Nginx(docs["Ingress"], [pod.port for pod in pods.values()], tmp_path / "nginx")
        yield pods, balancer
    finally:
        stop_all(pods, balancer)


def ran_names(pods: dict[str, Pod]) -> collections.Counter[str]:
    """How often the action ran each {"name": ...} message, over all pods."""
    names = re.compile(r"^ran \S+ \S+ (\S+)$", re.MULTILINE)
    return collections.Counter(name for pod in pods.values() for name in names.findall(pod.logs()) if name != "None")


def test_client_sends_again_what_the_drain_dropped(pair: Any) -> None:
    """The README's client: the reply in hand comes before the 1001, the message behind it is sent again and answered once."""
    pods, balancer = pair
    replies = asyncio.run(three_slow_messages(f"ws://127.0.0.1:{balancer.port}{PATH}", pods))
    assert [reply["id"] for reply in replies] == [1, 2, 3]
    first, last = replies[0]["connection"], replies[2]["connection"]
    assert replies[1]["connection"] == first and replica_of(last) != replica_of(first)
    assert ran_names(pods) == {"m1": 1, "m2": 1, "m3": 1}


async def three_slow_messages(url: str, pods: dict[str, Pod]) -> list[dict[str, Any]]:
    replies: list[dict[str, Any]] = []
    client = Client(url, replies.append)
    task = asyncio.create_task(client.run())
    try:
        for n in (1, 2, 3):  # 1 s each: m2 in hand and m3 waiting when the drain comes
            await client.send({"id": n, "name": f"m{n}"})
        await until(lambda: bool(replies), SETTLE, "no first reply")
        pods[replica_of(replies[0]["connection"])].process.send_signal(signal.SIGTERM)
        await until(lambda: len(replies) == 3, SETTLE, f"replies: {replies}")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return replies


def test_demo_page_reconnects_and_sends_again(pair: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Chromium on the demo page: its replica is terminated with messages waiting; it reconnects and each is answered once."""
    chromium = need("chromium")
    playwright_api = pytest.importorskip("playwright.sync_api")
    browser_home(tmp_path, monkeypatch)
    pods, balancer = pair
    received: list[dict[str, Any]] = []
    sockets: list[Any] = []
    wait = TIME_FACTOR * 20_000
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()

            def opened(ws: Any) -> None:
                sockets.append(ws)
                ws.on("framereceived", lambda payload: received.append(json.loads(payload)))

            page.on("websocket", opened)
            page.goto(f"http://127.0.0.1:{balancer.port}/", timeout=wait)
            page.wait_for_selector("#send:not([disabled])", timeout=wait)
            for name in ("m1", "m2", "m3"):  # 1 s each: m2 in hand and m3 waiting when the drain comes
                page.fill("#name", name)
                page.click("#send")
            page.wait_for_function("document.getElementById('reply').textContent.includes('m1')", timeout=wait)
            pods[replica_of(received[0]["connection"])].process.send_signal(signal.SIGTERM)
            page.wait_for_function("document.getElementById('reply').textContent.includes('m3')", timeout=wait)
            status = page.text_content("#status")
        finally:
            browser.close()
    assert [reply["name"] for reply in received] == ["m1", "m2", "m3"]
    first, last = received[0]["connection"], received[2]["connection"]
    assert received[1]["connection"] == first and replica_of(last) != replica_of(first)
    assert len(sockets) == 2 and status == f"connected to {PATH}"
    assert ran_names(pods) == {"m1": 1, "m2": 1, "m3": 1}
