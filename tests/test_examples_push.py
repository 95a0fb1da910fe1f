"""examples/chat.py, examples/chat.html and examples/feed.py, end to end.

The apps people copy, run as they would be: the real `actionloop` with the
management API and connection events, the example file as auto-init.
- chat on one replica without Redis: three `websockets` clients join a room,
  hear each word once and in order, and see presence change on a leave and
  on a disconnect (the disconnect event);
- chat on two replicas sharing Redis, one of which stops: the next join
  drops its members, whether or not its disconnect events ran;
- chat across two replicas sharing a private redis-server, behind a private
  nginx configured like the Ingress and spreading connections round robin
  as a Service would: chat.html in two Chromium pages, one on each replica;
- feed: two replicas, 50 clients across them, 20 stream entries. Every client
  gets all 20, in order, once, and Redis shows one consumer per replica.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from browsers.drivers import Chromium, launched, time_limit
from conftest import EXAMPLES, TIME_FACTOR, Server, ask, free_port
from deploy_helpers import Nginx, RedisServer, generate
from websockets.sync.client import ClientConnection, connect

TIMEOUT = 20 * TIME_FACTOR
TOKEN = "examples-api-token"
Message = dict[str, Any]


# ------------------------------------------------------------ the parts


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


# Any web server of the site serves the chat page; here, the ingress's nginx.
CHAT_PAGE = f"""        location = /chat.html {{
            default_type text/html;
            alias {EXAMPLES / "chat.html"};
        }}"""


def until(check: Callable[[], Any], why: str, timeout: float = TIMEOUT) -> Any:
    """Poll check() until it is true; its value, or fail saying why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(why)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def replica(start_server: Any, action: str, path: str, **env: str) -> Server:
    """The runtime serving examples/ACTION at path with the management API; once ready (and Redis up, if given)."""
    server: Server = start_server(
        {
            "OW_AUTOINIT": str(EXAMPLES / action),
            "OW_WEBSOCKET": path,
            "OW_API_TOKEN": TOKEN,
            "OW_API_PORT": str(free_port()),
            **env,
        }
    )

    def ready() -> bool:
        status, body = get(server.url + "/readyz")
        return status == 200 and ("OW_REDIS_URL" not in env or json.loads(body).get("redis") == "up")

    until(ready, f"the replica never became ready: {server.err()}")
    return server


def open_connections(server: Server) -> int:
    """The server's own count of open WebSocket connections (/metrics)."""
    for line in get(server.url + "/metrics")[1].decode().splitlines():
        if line.startswith("actionloop_websocket_connections "):
            return int(float(line.split()[1]))
    raise AssertionError("no actionloop_websocket_connections in /metrics")


# ---------------------------------------------------------- (a) one replica


class Member:
    """A chat client: it gets the replies (no "room") and keeps what its rooms push, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pushed: list[Message] = []

    def ask(self, message: Any) -> Message:
        self.ws.send(json.dumps(message))
        while True:
            got: Message = json.loads(self.ws.recv(timeout=TIMEOUT))
            if "room" not in got:
                return got
            self.pushed.append(got)

    def hear(self, check: Callable[[Message], bool]) -> Message:
        """The first pushed message that passes check, waiting for it if need be."""
        while not any(check(m) for m in self.pushed):
            got: Message = json.loads(self.ws.recv(timeout=TIMEOUT))
            assert "room" in got, f"a reply nobody asked for: {got}"
            self.pushed.append(got)
        return next(m for m in self.pushed if check(m))

    def said(self) -> list[tuple[str, str, str]]:
        return [(m["room"], m["from"], m["text"]) for m in self.pushed if "text" in m]

    def present(self, room: str) -> list[str]:
        """Who is in room, as the newest presence change this client heard says."""
        changes = [m for m in self.pushed if m["room"] == room and "members" in m]
        newest = max(changes, key=lambda m: int(m["version"]))
        return sorted(newest["members"].values())


def event(kind: str, name: str, room: str = "lobby") -> Callable[[Message], bool]:
    return lambda m: m.get("event") == kind and m["name"] == name and m["room"] == room


def test_chat_on_one_replica(start_server: Any) -> None:
    """Three clients in a room, no Redis: every join, word and leave reaches each member once, in order."""
    server = replica(start_server, "chat.py", "/chat", OW_WEBSOCKET_EVENTS="1")
    url = server.ws_url("/chat")
    with (
        connect(url, open_timeout=TIMEOUT) as ws_ann,
        connect(url, open_timeout=TIMEOUT) as ws_bob,
        connect(url, open_timeout=TIMEOUT) as ws_cy,
    ):
        ann, bob, cy = Member(ws_ann), Member(ws_bob), Member(ws_cy)
        for name, member in (("Ann", ann), ("Bob", bob), ("Cy", cy)):
            assert member.ask({"join": "lobby", "name": name}) == {"joined": "lobby"}
        for member in (ann, bob, cy):
            member.hear(event("join", "Cy"))
            assert member.present("lobby") == ["Ann", "Bob", "Cy"]
        assert len(ann.hear(event("join", "Cy"))["members"]) == 3  # three connections, three ids

        for text in ("one", "two", "three"):
            assert ann.ask({"say": text, "room": "lobby"}) == {"said": "lobby"}
        for member in (ann, bob, cy):
            member.hear(lambda m: m.get("text") == "three")
            assert member.said() == [("lobby", "Ann", "one"), ("lobby", "Ann", "two"), ("lobby", "Ann", "three")]

        # Leaving by message: the others hear it; the leaver hears the room no more.
        assert cy.ask({"leave": "lobby"}) == {"left": "lobby"}
        for member in (ann, bob):
            member.hear(event("leave", "Cy"))
            assert member.present("lobby") == ["Ann", "Bob"]
        assert "error" in cy.ask({"say": "anyone?", "room": "lobby"})
        assert bob.ask({"say": "bye", "room": "lobby"}) == {"said": "lobby"}
        ann.hear(lambda m: m.get("text") == "bye")
        # A push to Cy would be out before this reply, which comes after Bob's.
        assert "error" in cy.ask({"leave": "lobby"})
        assert ("lobby", "Bob", "bye") not in cy.said()

        # Leaving by disconnecting: the disconnect event announces it in each room the connection was in.
        assert bob.ask({"join": "den", "name": "Bob"}) == {"joined": "den"}
        assert cy.ask({"join": "den", "name": "Cy"}) == {"joined": "den"}
        ws_bob.close()
        ann.hear(event("leave", "Bob"))
        assert ann.present("lobby") == ["Ann"]
        cy.hear(event("leave", "Bob", "den"))
        assert cy.present("den") == ["Cy"]
        assert not any(m["room"] == "den" for m in ann.pushed)

        assert "error" in ann.ask({"shout": "?"})
        assert "error" in ann.ask([1, 2])  # not an object


def test_chat_forgets_members_of_a_stopped_replica(start_server: Any, redis_server: RedisServer) -> None:
    """A replica stops with a member on it; the next join in the room no longer lists that member."""
    shared = {"OW_REDIS_URL": redis_server.url, "OW_WEBSOCKET_EVENTS": "1"}
    replicas = [replica(start_server, "chat.py", "/chat", HOSTNAME=f"chat-{n}", **shared) for n in range(2)]
    with (
        connect(replicas[0].ws_url("/chat"), open_timeout=TIMEOUT) as ws_ann,
        connect(replicas[1].ws_url("/chat"), open_timeout=TIMEOUT) as ws_bob,
        connect(replicas[0].ws_url("/chat"), open_timeout=TIMEOUT) as ws_cy,
    ):
        ann, bob, cy = Member(ws_ann), Member(ws_bob), Member(ws_cy)
        assert ann.ask({"join": "lobby", "name": "Ann"}) == {"joined": "lobby"}
        assert bob.ask({"join": "lobby", "name": "Bob"}) == {"joined": "lobby"}
        ann.hear(event("join", "Bob"))
        assert ann.present("lobby") == ["Ann", "Bob"]
        replicas[1].stop()
        assert cy.ask({"join": "lobby", "name": "Cy"}) == {"joined": "lobby"}
        assert sorted(cy.hear(event("join", "Cy"))["members"].values()) == ["Ann", "Cy"]
        ann.hear(event("join", "Cy"))
        assert ann.present("lobby") == ["Ann", "Cy"]


# ------------------------------------------------- (b) two replicas, Chromium

PRESENT = "[...document.querySelectorAll('#presence li')].map(li => li.textContent).join(',')"
MESSAGES = "[...document.querySelectorAll('#messages li')].map(li => li.textContent)"


def test_chat_across_replicas_in_chromium(start_server: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    """chat.html in two Chromium pages on two replicas (nginx, round robin; one Redis): words and presence cross."""
    with time_limit(120 * TIME_FACTOR) as deadline:
        shared = {"OW_REDIS_URL": redis_server.url, "OW_WEBSOCKET_EVENTS": "1"}
        replicas = [replica(start_server, "chat.py", "/chat", HOSTNAME=f"chat-{n}", **shared) for n in range(2)]
        ingress = generate(EXAMPLES / "chat.py", "--name", "chat", "--path", "/chat")["Ingress"]
        proxy = Nginx(ingress, [r.port for r in replicas], tmp_path / "nginx", extra=CHAT_PAGE)
        try:
            with launched("chromium", tmp_path / "chromium", deadline) as browser:
                assert isinstance(browser, Chromium)
                site = f"http://127.0.0.1:{proxy.port}"
                ms = TIMEOUT * 1000
                ann = browser.page
                # One page finds the WebSocket on its own host, the other is told it in the query.
                bob = browser.context.new_page()
                ann.goto(f"{site}/chat.html", timeout=ms)
                bob.goto(f"{site}/chat.html?ws=ws://127.0.0.1:{proxy.port}/chat", timeout=ms)
                for page in (ann, bob):
                    page.wait_for_selector("#join:not([disabled])", timeout=ms)
                assert [open_connections(r) for r in replicas] == [1, 1], "one page on each replica"

                # The tab in front gets animation frames, which a click waits for: switch tabs as a user would.
                for page, name in ((ann, "Ann"), (bob, "Bob")):
                    page.bring_to_front()
                    page.fill("#name", name)
                    page.fill("#room", "lobby")
                    page.click("#join")
                for page in (ann, bob):
                    page.wait_for_function(f"{PRESENT} === 'Ann,Bob'", timeout=ms, polling=50)

                ann.bring_to_front()
                ann.fill("#text", "hello from Ann")
                ann.click("#say")
                bob.wait_for_function(f"{MESSAGES}.includes('Ann: hello from Ann')", timeout=ms, polling=50)
                bob.bring_to_front()
                bob.fill("#text", "hi Ann")
                bob.press("#text", "Enter")
                ann.wait_for_function(f"{MESSAGES}.includes('Bob: hi Ann')", timeout=ms, polling=50)
                for page in (ann, bob):
                    said = [line for line in page.evaluate(MESSAGES) if ": " in line]
                    assert said == ["Ann: hello from Ann", "Bob: hi Ann"]
                ann.screenshot(path=str(tmp_path / "chat.png"))

                # Bob's tab closes: his replica's disconnect event tells Ann's replica's page.
                bob.close()
                ann.wait_for_function(f"{PRESENT} === 'Ann'", timeout=ms, polling=50)
                ann.wait_for_function(f"{MESSAGES}.includes('Bob left')", timeout=ms, polling=50)
        finally:
            proxy.stop()


# -------------------------------------------------------------- (c) the feed


def consumers(client: redis.Redis) -> dict[str, str]:
    """The stream consumers Redis sees now: their names (feed@POD) to their connection ids."""
    return {c["name"]: c["id"] for c in client.client_list() if c["name"].startswith("feed@")}


@pytest.mark.parametrize("joined", [True, False], ids=["replicas-joined-by-redis", "replicas-alone"])
def test_feed_one_consumer_per_pod(start_server: Any, redis_server: RedisServer, joined: bool) -> None:
    """50 clients on two replicas get 20 stream entries each, in order, once; one consumer per replica throughout."""
    env = {"OW_REDIS_URL": redis_server.url} if joined else {"FEED_REDIS_URL": redis_server.url}
    replicas = [replica(start_server, "feed.py", "/feed", HOSTNAME=f"pod-{n}", **env) for n in range(2)]
    store = redis.Redis(port=redis_server.port, decode_responses=True, single_connection_client=True)
    before = until(lambda: len(consumers(store)) == 2 and consumers(store), "consumers")
    assert sorted(before) == ["feed@pod-0", "feed@pod-1"]
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(connect(replicas[n % 2].ws_url("/feed"), open_timeout=TIMEOUT)) for n in range(50)
        ]
        for ws in clients:
            assert ask(ws, {"subscribe": True}) == {"subscribed": "feed"}
        assert [open_connections(r) for r in replicas] == [25, 25]
        ids = [store.xadd("feed", {"n": str(n)}) for n in range(20)]
        for ws in clients:
            got = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in ids]
            assert [(m["id"], m["fields"]) for m in got] == [(id_, {"n": str(n)}) for n, id_ in enumerate(ids)]
        # Exactly once: the next thing each client gets is the entry after them.
        last = store.xadd("feed", {"n": "last"})
        for ws in clients:
            assert json.loads(ws.recv(timeout=TIMEOUT)) == {"stream": "feed", "id": last, "fields": {"n": "last"}}
        # One consumer per pod, the same connection all along, however many
        # clients; and no other connection reads the stream.
        assert consumers(store) == before
        readers = {c["name"]: c["id"] for c in store.client_list() if c["cmd"] == "xread"}
        assert readers == before
    store.close()
