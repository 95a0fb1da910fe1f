"""The hub across replicas, over Redis (SPEC.md part D; OW_REDIS_URL).

What Redis holds, all under one prefix:
- `replica:NAME`, a key each replica sets every HEARTBEAT seconds with an
  expiry of REPLICA_TTL: a replica that died (SIGKILL, a lost node) has its
  connections read as gone within REPLICA_TTL seconds;
- `conn:ID`, a hash per connection (its replica, when it connected, when it
  was last active, its channels), written by the replica that holds it and
  refreshed with the heartbeat;
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
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from . import protocol
from .errors import Unavailable

if TYPE_CHECKING:
    from .hub import Hub, Member

HEARTBEAT = 3.0
REPLICA_TTL = 10
CONNECTION_TTL = 120
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
        self.redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10)
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
            await self.redis.delete(self.key("replica", self.replica))
        except RedisError:
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
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._came_up()
                if time.monotonic() - refreshed > CONNECTION_TTL / 4:
                    refreshed = time.monotonic()
                    for member in self.hub.members.values():
                        self._dirty.setdefault(member.id, member)
                self._flush_soon()
            except (RedisError, OSError) as exc:
                self._went_down(exc)

    async def _alive(self) -> None:
        await self.redis.set(self.key("replica", self.replica), b"1", ex=REPLICA_TTL)

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
                batch, self._dirty = self._dirty, {}
                pipe = self.redis.pipeline(transaction=False)
                for connection, member in batch.items():
                    key = self.key("conn", connection)
                    if member is None:
                        pipe.delete(key)
                    else:
                        pipe.hset(key, mapping=self._record(member))
                        pipe.expire(key, CONNECTION_TTL)
                try:
                    await pipe.execute()
                except (RedisError, OSError) as exc:
                    for connection, member in batch.items():
                        self._dirty.setdefault(connection, member)
                    self._went_down(exc)
        finally:
            self._flushing = None

    def _record(self, member: Member) -> dict[FieldT, EncodableT]:
        return {
            "replica": self.replica,
            "connected_at": str(round(member.connected_at, 3)),
            "last_active_at": str(round(member.last_active_at, 3)),
            "channels": protocol.dumps(sorted(member.channels)).decode(),
        }

    # ----------------------------------------------------- the hub's calls

    async def _call(self, work: Any) -> Any:
        try:
            return await work
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            raise Unavailable(f"Redis is unreachable, so other replicas cannot be reached: {exc}") from exc

    async def owner(self, connection: str) -> str | None:
        """The replica holding `connection`, if it is alive; None: gone."""
        replica = await self._call(self.redis.hget(self.key("conn", connection), "replica"))
        if replica is None:
            return None
        name = replica.decode()
        alive = await self._call(self.redis.exists(self.key("replica", name)))
        return name if alive else None

    async def describe(self, connection: str) -> dict[str, Any] | None:
        record = await self._call(self.redis.hgetall(self.key("conn", connection)))
        if not record:
            return None
        replica = record[b"replica"].decode()
        if not await self._call(self.redis.exists(self.key("replica", replica))):
            return None
        return {
            "id": connection,
            "replica": replica,
            "connected_at": float(record[b"connected_at"]),
            "last_active_at": float(record[b"last_active_at"]),
            "channels": protocol.loads(record[b"channels"]),
        }

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
