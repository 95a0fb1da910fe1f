"""The management API across replicas over a real Redis (contract part D).

A private redis-server on a free loopback port (no persistence, its own
folder) and two or three real `actionloop` replicas sharing it, each with
its own HOSTNAME and API port: sends and descriptions reach another
replica's connections, a publish or broadcast reaches every subscriber of
every replica exactly once, a replica killed with SIGKILL has its
connections read as gone within the stated 10 s, and Redis stopped and
started again: local work goes on, the rest answers 503, then everything
comes back by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from conftest import TIME_FACTOR, Server
from deploy_helpers import RedisServer
from test_push import API, TIMEOUT, client, nothing_more, pushing, receive, until
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

# What README promises: a dead replica's connections read as gone within 10 s.
REPLICA_TTL = 10.0
# A publish reaches a subscriber once: after the last one, this long for a duplicate to show.
GRACE = 1.0 * TIME_FACTOR


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis, stopped at the end of the test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def replica(start_server: Any, tmp_path: Path, redis: RedisServer, name: str) -> tuple[Server, API]:
    """One replica joined to `redis`, its HOSTNAME `name`; returns once it has reached Redis."""
    server, api = pushing(start_server, tmp_path, {"OW_REDIS_URL": redis.url, "HOSTNAME": name})
    redis_says(server, "up")
    return server, api


def redis_says(server: Server, state: str, timeout: float = TIMEOUT) -> None:
    """Until the server's /readyz says Redis is `state` ("up" or "down")."""
    until(lambda: readiness(server).get("redis") == state, f"/readyz does not say redis {state}", timeout, 0.2)


def readiness(server: Server) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(server.url + "/readyz", timeout=TIMEOUT) as response:
            found: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        found = json.loads(exc.read())
    return found


def known(api: API, connection: str) -> dict[str, Any]:
    """Until `api` describes `connection` (its record is written just after it opens)."""
    found: dict[str, Any] = until(
        lambda: (lambda answer: answer[1] if answer[0] == 200 else None)(api.call("GET", f"/connections/{connection}")),
        f"{connection} is not known to the API on port {api.port}",
    )
    return found


def collect(ws: ClientConnection, grace: float = GRACE) -> list[Any]:
    """Every message that arrives until none has for `grace` seconds, or the connection ends."""
    got = []
    while True:
        try:
            got.append(json.loads(ws.recv(timeout=grace)))
        except (TimeoutError, ConnectionClosed):
            return got


def exactly(expected: dict[ClientConnection, list[Any]]) -> None:
    """Each connection receives exactly its list, in order, and nothing more within GRACE."""
    for ws, messages in expected.items():
        assert [receive(ws) for _ in messages] == messages
    time.sleep(GRACE)  # one grace period for every connection: a duplicate would be here by now
    for ws in expected:
        nothing_more(ws, 0.01)


def test_send_and_describe_across_replicas(start_server: Any, tmp_path: Path, redis: RedisServer) -> None:
    """Replica 1's API sends to, describes, subscribes and closes a connection of replica 2."""
    _, one = replica(start_server, tmp_path, redis, "replica1")
    two_server, two = replica(start_server, tmp_path, redis, "replica2")
    with client(two_server) as (ws, them):
        found = known(one, them)
        assert found["id"] == them and found["channels"] == []
        assert found["replica"].startswith("replica2-") and them.startswith(found["replica"] + "-")
        assert abs(found["connected_at"] - time.time()) < 30

        assert one.call("POST", f"/connections/{them}", {"from": "replica1"}) == (200, {"sent": True})
        assert receive(ws) == {"from": "replica1"}

        assert one.call("PUT", f"/connections/{them}/channels/news") == (200, {"subscribed": True})
        until(lambda: one.call("GET", f"/connections/{them}")[1]["channels"] == ["news"], "the channel is not shown")
        assert two.call("GET", f"/connections/{them}")[1]["channels"] == ["news"]
        assert one.call("DELETE", f"/connections/{them}/channels/news") == (200, {"unsubscribed": True})
        until(lambda: one.call("GET", f"/connections/{them}")[1]["channels"] == [], "the channel is still shown")

        assert one.call("DELETE", f"/connections/{them}") == (200, {"closed": True})
        assert collect(ws) == []
        assert ws.close_code == 1000, ws.close_reason
    until(lambda: one.call("GET", f"/connections/{them}")[0] == 410, "a closed connection is still described")
    assert one.call("POST", f"/connections/{them}", 1)[0] == 410
    assert one.call("GET", "/connections/replica2-abcdef-99")[0] == 410


def test_publish_and_broadcast_reach_everyone_once(start_server: Any, tmp_path: Path, redis: RedisServer) -> None:
    """3 replicas, 3 subscribers and 1 bystander each: every publish and broadcast arrives exactly once."""
    replicas = [replica(start_server, tmp_path, redis, f"replica{n}") for n in (1, 2, 3)]
    with ExitStack() as stack:
        subscribers: list[tuple[ClientConnection, str]] = []
        bystanders: list[ClientConnection] = []
        for n, (server, _) in enumerate(replicas):
            for k in range(4):
                ws, me = stack.enter_context(client(server))
                if k == 3:
                    bystanders.append(ws)
                    continue
                # Subscribed through its own replica's API or another's.
                _, api = replicas[(n + k) % 3]
                known(api, me)
                assert api.call("PUT", f"/connections/{me}/channels/room") == (200, {"subscribed": True})
                subscribers.append((ws, me))
        for n in range(30):  # from every replica's API in turn
            _, api = replicas[n % 3]
            assert api.call("POST", "/channels/room", {"n": n}) == (200, {"published": True})
        published = [{"n": n} for n in range(30)]
        exactly({ws: published for ws, _ in subscribers} | {ws: [] for ws in bystanders})

        for n in range(10):
            _, api = replicas[(n + 1) % 3]
            assert api.call("POST", "/broadcast", {"b": n}) == (200, {"broadcast": True})
        everyone = [ws for ws, _ in subscribers] + bystanders
        exactly({ws: [{"b": n} for n in range(10)] for ws in everyone})


def test_killed_replica_reads_as_gone(start_server: Any, tmp_path: Path, redis: RedisServer) -> None:
    """A replica killed with SIGKILL: its connections read as gone (410) on the others within 10 s."""
    _, one = replica(start_server, tmp_path, redis, "replica1")
    two_server, _ = replica(start_server, tmp_path, redis, "replica2")
    with client(two_server) as (ws, them):
        known(one, them)
        os.killpg(two_server.process.pid, signal.SIGKILL)
        two_server.process.wait()
        killed = time.monotonic()
        assert one.call("POST", f"/connections/{them}", 1)[0] == 410  # nobody hears it: gone at once
        until(
            lambda: one.call("GET", f"/connections/{them}")[0] == 410,
            "a dead replica's connection is still described",
            timeout=REPLICA_TTL + 3 * TIME_FACTOR,
            every=0.2,
        )
        gone = time.monotonic() - killed
        print(f"gone after {gone:.1f} s")  # pytest -s shows it
        assert one.call("PUT", f"/connections/{them}/channels/x")[0] == 410
        assert one.call("DELETE", f"/connections/{them}")[0] == 410
        ws.close_socket()


def test_redis_outage_and_return(start_server: Any, tmp_path: Path, redis: RedisServer) -> None:
    """Redis stopped: local sends 200, another replica's 503, /readyz says down; started again: all works."""
    one_server, one = replica(start_server, tmp_path, redis, "replica1")
    two_server, two = replica(start_server, tmp_path, redis, "replica2")
    with client(one_server) as (mine, me), client(two_server) as (theirs, them):
        known(one, them)
        for api, connection in ((one, me), (two, them)):
            assert api.call("PUT", f"/connections/{connection}/channels/room")[0] == 200

        redis.stop()
        redis_says(one_server, "down")
        state = readiness(one_server)
        assert state["redis"] == "down" and state["ready"] is True, state
        assert one.call("POST", f"/connections/{me}", {"local": 1}) == (200, {"sent": True})
        assert receive(mine) == {"local": 1}
        status, answer = one.call("POST", f"/connections/{them}", {"remote": 1})
        assert status == 503 and "Redis" in answer["error"], (status, answer)
        assert one.call("GET", f"/connections/{them}")[0] == 503
        # A publish still reaches this replica's subscribers, once; the answer says the rest did not.
        status, answer = one.call("POST", "/channels/room", {"during": 1})
        assert status == 503 and "Redis" in answer["error"], (status, answer)
        assert collect(mine) == [{"during": 1}]
        assert collect(theirs) == []

        redis.start()  # same port, empty: what the replicas had written is gone
        back = time.monotonic()
        sent: list[int] = []

        def reaches_them() -> bool:
            status = one.call("POST", f"/connections/{them}", {"again": len(sent)})[0]
            assert status in (200, 410, 503), status
            sent.append(status)
            return status == 200

        until(reaches_them, "a cross-replica send does not work again", timeout=15 * TIME_FACTOR, every=0.2)
        print(f"back after {time.monotonic() - back:.1f} s, {len(sent)} tries")  # pytest -s shows it
        # Only the send that answered 200 arrived, once.
        assert collect(theirs) == [{"again": len(sent) - 1}]
        for server in (one_server, two_server):
            redis_says(server, "up")
        assert known(one, them)["channels"] == ["room"]  # its record, written anew
        assert known(two, me)["channels"] == ["room"]
        assert two.call("POST", "/channels/room", {"after": 1}) == (200, {"published": True})
        assert collect(mine) == [{"after": 1}] and collect(theirs) == [{"after": 1}]
        assert two.call("POST", f"/connections/{me}", {"remote": 2}) == (200, {"sent": True})
        assert receive(mine) == {"remote": 2}
    for server in (one_server, two_server):
        err = server.err()
        assert "actionloop: Redis unreachable" in err, err
        assert err.rindex("actionloop: Redis reached") > err.index("actionloop: Redis unreachable"), err


def test_redis_stall_then_back(start_server: Any, tmp_path: Path, redis: RedisServer) -> None:
    """Redis frozen for 5 s (connections kept, calls time out): then both replicas say up and register new connections."""
    one_server, one = replica(start_server, tmp_path, redis, "replica1")
    two_server, two = replica(start_server, tmp_path, redis, "replica2")
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)  # longer than a heartbeat plus its 2 s timeout
    try:
        time.sleep(5.5)
    finally:
        redis.process.send_signal(signal.SIGCONT)
    thawed = time.monotonic()
    for server in (one_server, two_server):
        redis_says(server, "up", REPLICA_TTL * TIME_FACTOR)
    print(f"up after {time.monotonic() - thawed:.1f} s")  # pytest -s shows it
    with client(one_server) as (mine, me), client(two_server) as (theirs, them):
        assert known(two, me)["replica"].startswith("replica1-")
        assert known(one, them)["replica"].startswith("replica2-")
        assert two.call("POST", f"/connections/{me}", {"to": "one"}) == (200, {"sent": True})
        assert one.call("POST", f"/connections/{them}", {"to": "two"}) == (200, {"sent": True})
        assert receive(mine) == {"to": "one"} and receive(theirs) == {"to": "two"}


def test_channel_cap_through_another_replica(start_server: Any, tmp_path: Path, redis: RedisServer) -> None:
    """Through another replica too, a connection's 1,001st channel is a 400 (once its record shows 1,000)."""
    _, one = replica(start_server, tmp_path, redis, "replica1")
    two_server, two = replica(start_server, tmp_path, redis, "replica2")
    with client(two_server) as (_, them):
        for n in range(1000):
            assert one.call("PUT", f"/connections/{them}/channels/c{n}")[0] == 200
        until(lambda: len(known(one, them)["channels"]) == 1000, "the record does not show 1,000 channels")
        status, body = one.call("PUT", f"/connections/{them}/channels/one-more")
        assert status == 400 and "1000 channels" in body["error"], body
        assert one.call("PUT", f"/connections/{them}/channels/c0")[0] == 200  # already in it: fine
        assert "one-more" not in two.call("GET", f"/connections/{them}")[1]["channels"]


def redis_clients(redis: RedisServer) -> int:
    listed = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "CLIENT", "LIST"], capture_output=True, check=True, timeout=TIMEOUT
    )
    return len(listed.stdout.splitlines()) - 1  # not redis-cli itself


def test_a_burst_of_requests_shares_few_redis_connections(
    start_server: Any, tmp_path: Path, redis: RedisServer
) -> None:
    """200 API calls at once, each needing Redis, all succeed over at most 16 Redis connections."""
    import concurrent.futures

    _, one = replica(start_server, tmp_path, redis, "replica1")
    two_server, _ = replica(start_server, tmp_path, redis, "replica2")
    before = redis_clients(redis)
    with client(two_server) as (ws, them), concurrent.futures.ThreadPoolExecutor(50) as threads:
        known(one, them)
        calls = [threads.submit(one.call, "POST", f"/connections/{them}", n) for n in range(100)]
        calls += [threads.submit(one.call, "POST", "/channels/nobody", n) for n in range(100)]
        assert all(call.result()[0] == 200 for call in calls), [call.result() for call in calls]
        assert sorted(receive(ws) for _ in range(100)) == list(range(100))
    assert redis_clients(redis) - before <= 16
