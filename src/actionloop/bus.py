"""The hub across replicas, over Redis (contract part D; OW_REDIS_URL).

What Redis holds, all under one prefix:
- `replica:NAME`, a key each replica sets every HEARTBEAT seconds with an
  expiry of REPLICA_TTL: a replica that died (SIGKILL, a lost node) has its
  connections read as gone within REPLICA_TTL seconds;
- `conns:NAME`, a hash per replica: for each of its connections, a JSON
  record (when it connected, when it was last active, its channels). Only
  what changed is written, many fields a command; the heartbeat renews the
  whole hash's expiry in one command, whatever the number of connections.
  A connection id names its replica (hub.new_id), so finding one is one
  round trip: is the replica alive, and does its hash hold the id;
- two kinds of pub/sub channel: `to:NAME` for what must happen to a
  connection of replica NAME (send, close, subscribe, unsubscribe), and
  `all`, which every replica hears, for channel publishes and broadcasts:
  each replica delivers to its own connections, so every subscriber gets a
  message once.

A message on the wire is a JSON header line, then the data as it is.
When Redis cannot be reached, calls raise Unavailable (the API answers 503);
the bus keeps reconnecting by itself, says so in the log, and on coming back
writes its connections anew (a Redis restarted without persistence has
forgotten them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from . import protocol
from .errors import Unavailable
from .hub import replica_of

if TYPE_CHECKING:
    from .hub import Hub, Member

HEARTBEAT = 3.0
REPLICA_TTL = 10
# A replica's records outlive a stall of its heartbeat (then its connections
# read as gone, and are found again when it beats), and go with a dead replica.
CONNECTION_TTL = 120
# Records of connections active since are written again this often, so
# another replica's GET shows last_active_at at most this old.
REFRESH = 30.0
# Fields a command: a write of 10,000 records is many short commands, and the
# event loop serves others between them.
CHUNK = 500
# Connections to Redis at most: a replica that falls behind waits for one
# (POOL_WAIT seconds) rather than opening more, each slower than the last.
POOL_SIZE = 16
POOL_WAIT = 5.0
RETRY_MAX = 5.0
PREFIX = "actionloop:"
LOGGER = logging.getLogger("actionloop.bus")


def log(message: str) -> None:
    sys.stderr.write(f"actionloop: {message}\n")
    sys.stderr.flush()


def encode(operation: dict[str, Any]) -> bytes:
    header = {key: value for key, value in operation.items() if key != "data"}
    data: bytes = operation.get("data", b"")
    return protocol.dumps(header) + b"\n" + data


def decode(payload: bytes) -> dict[str, Any]:
    header, _, data = payload.partition(b"\n")
    operation: dict[str, Any] = protocol.loads(header)
    operation["data"] = data
    return operation


class RedisBus:
    """One replica's link to the others through Redis."""

    def __init__(self, url: str, hub: Hub) -> None:
        self.hub = hub
        self.replica = hub.replica
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_timeout=2,
            socket_connect_timeout=2,
            health_check_interval=10,
        )
        self.redis = redis.Redis.from_pool(pool)
        self.records = self.key("conns", self.replica)
        self.up = False
        self.listening = False  # subscribed to `all` and `to:NAME` now
        self._dirty: dict[str, Member | None] = {}  # connections to write (None: to delete)
        self._flushing: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def key(self, *parts: str) -> str:
        return PREFIX + ":".join(parts)

    # ------------------------------------------------------------ life

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._heartbeat())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.redis.delete(self.key("replica", self.replica), self.records)
        except (RedisError, OSError):
            pass
        await self.redis.aclose()

    async def _listen(self) -> None:
        """Hear `all` and `to:NAME`; after a failure, connect again (backing off)."""
        retry = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.key("all"), self.key("to", self.replica))
                self.listening = True
                await self._came_up()
                retry = 0.2
                async for message in pubsub.listen():
                    self._heard(message["data"])
            except (RedisError, OSError) as exc:
                self._went_down(exc)
            finally:
                self.listening = False
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(retry)
            retry = min(retry * 2, RETRY_MAX)

    def _heard(self, payload: bytes) -> None:
        try:
            self.hub.local(decode(payload))
        except Exception:  # one bad message must not stop the bus
            LOGGER.exception("a message on the bus could not be carried out")

    async def _came_up(self) -> None:
        """Redis answered: if the bus was down, it is up again and writes its connections anew."""
        await self._alive()
        if not self.up:
            self.up = True
            log(f"Redis reached; replica {self.replica} joins the others")
            for member in self.hub.members.values():
                self._dirty.setdefault(member.id, member)
            self._flush_soon()

    def _went_down(self, exc: BaseException) -> None:
        if self.up:
            log(f"Redis unreachable ({exc}); local delivery goes on, reconnecting")
        self.up = False

    async def _heartbeat(self) -> None:
        """Keep this replica alive in Redis and its connections' records fresh.

        A heartbeat that gets through brings the bus back up: after a call
        timed out on a stalled Redis, the listener's connection may never
        fail, so it would not (the bus would stay down, writing nothing).
        """
        refreshed = time.time()
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._came_up()
                if time.time() - refreshed > REFRESH:
                    for member in self.hub.members.values():
                        if member.last_active_at >= refreshed:
                            self._dirty.setdefault(member.id, member)
                    refreshed = time.time()
                self._flush_soon()
            except (RedisError, OSError) as exc:
                self._went_down(exc)

    async def _alive(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key("replica", self.replica), b"1", ex=REPLICA_TTL)
        pipe.expire(self.records, CONNECTION_TTL)
        await pipe.execute()

    # ------------------------------------------- connection records (writes)

    def joined(self, member: Member) -> None:
        self._dirty[member.id] = member
        self._flush_soon()

    def changed(self, member: Member) -> None:
        self.joined(member)

    def left(self, member: Member) -> None:
        self._dirty[member.id] = None
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flushing is None and self._dirty and self.up:
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        """Write the records that changed, many in one round trip."""
        try:
            while self._dirty and self.up:
                batch = dict(itertools.islice(self._dirty.items(), CHUNK))
                for connection in batch:
                    del self._dirty[connection]
                gone = [connection for connection, member in batch.items() if member is None]
                records: dict[FieldT, EncodableT] = {
                    connection: self._record(member) for connection, member in batch.items() if member
                }
                pipe = self.redis.pipeline(transaction=False)
                if records:
                    pipe.hset(self.records, mapping=records)
                    pipe.expire(self.records, CONNECTION_TTL)
                if gone:
                    pipe.hdel(self.records, *gone)
                try:
                    await pipe.execute()
                except (RedisError, OSError) as exc:
                    # Written again from the next heartbeat on, which also says
                    # whether Redis is down (not this: it may be this replica
                    # that is slow).
                    for connection, member in batch.items():
                        self._dirty.setdefault(connection, member)
                    LOGGER.debug("connection records not written: %r", exc)
                    return
        finally:
            self._flushing = None

    def _record(self, member: Member) -> bytes:
        return protocol.dumps(
            {
                "connected_at": round(member.connected_at, 3),
                "last_active_at": round(member.last_active_at, 3),
                "channels": sorted(member.channels),
            }
        )

    # ----------------------------------------------------- the hub's calls

    async def _call(self, work: Any) -> Any:
        """A request's call; a failure is a 503 for that request. Only the
        heartbeat and the listener say Redis is down: a call may fail because
        this replica is overloaded (no free connection, a late reply)."""
        try:
            return await work
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unreachable, so other replicas cannot be reached: {exc}") from exc

    async def _find(self, connection: str, command: str) -> tuple[str, Any] | None:
        """The replica `connection` names and `command` (hexists, hget) on its
        record, in one round trip; None if that replica is not alive."""
        replica = replica_of(connection)
        if replica is None:
            return None
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.key("replica", replica))
        getattr(pipe, command)(self.key("conns", replica), connection)
        alive, found = await self._call(pipe.execute())
        return (replica, found) if alive and found else None

    async def owner(self, connection: str) -> str | None:
        """The replica holding `connection`, if it is alive; None: gone."""
        found = await self._find(connection, "hexists")
        return None if found is None else found[0]

    async def describe(self, connection: str) -> dict[str, Any] | None:
        found = await self._find(connection, "hget")
        if found is None:
            return None
        replica, record = found
        return {"id": connection, "replica": replica, **protocol.loads(record)}

    async def forward(self, replica: str, operation: dict[str, Any]) -> bool:
        """Hand an operation to the replica holding its connection; False if nobody heard it."""
        heard = await self._call(self.redis.publish(self.key("to", replica), encode(operation)))
        return bool(heard)

    async def fan_out(self, operation: dict[str, Any]) -> None:
        """Publish to every replica. This one hears it through its own
        subscription; if that is not (yet) back after an outage, Redis counts
        nobody or the listener says so: Unavailable, and the hub delivers here."""
        if not self.listening:
            raise Unavailable("Redis is being reconnected to; other replicas may not have heard this")
        heard = await self._call(self.redis.publish(self.key("all"), encode(operation)))
        if not heard:
            raise Unavailable("no replica heard this through Redis (it was restarted?)")
