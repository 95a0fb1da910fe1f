"""Connections by id, and the channels they are in (contract part D).

The hub is what the management API (api.py) and the WebSocket endpoint share:
every open connection joins it with an id unique across replicas, and leaves
it when it ends. One replica needs nothing else. With a bus (bus.py, over
Redis) the same calls reach the connections of every replica: the hub asks
the bus which replica holds a connection and hands it the operation, and
channel publishes and broadcasts go to every replica, each delivering to its
own connections once.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
from collections.abc import Collection
from typing import Any, Protocol

from .errors import RequestError, Unavailable

# Channels one connection may be in: each costs memory on every write of its record.
MAX_CHANNELS = 1000
# A connection's own words when the API closes it.
CLOSED_BY_API = b"closed by the management API"


class Member(Protocol):
    """What the hub needs of a connection (websocket.Conversation)."""

    connected_at: float  # epoch seconds
    channels: set[str]

    @property
    def id(self) -> str: ...
    @property
    def last_active_at(self) -> float: ...
    def push(self, data: bytes) -> bool: ...
    def end(self, reason: bytes) -> None: ...


class Bus(Protocol):
    """Reaches the other replicas (bus.py); every method may raise Unavailable."""

    up: bool  # whether the other replicas can be reached now

    async def owner(self, connection: str) -> str | None: ...
    async def describe(self, connection: str) -> dict[str, Any] | None: ...
    async def forward(self, replica: str, operation: dict[str, Any]) -> bool: ...
    async def fan_out(self, operation: dict[str, Any]) -> None: ...
    def joined(self, member: Member) -> None: ...
    def left(self, member: Member) -> None: ...
    def changed(self, member: Member) -> None: ...
    async def close(self) -> None: ...


def replica_name() -> str:
    """This replica's name: the pod's (HOSTNAME), made unique by a random suffix."""
    host = os.environ.get("HOSTNAME") or socket.gethostname() or "replica"
    return f"{host}-{os.urandom(3).hex()}"


def replica_of(connection: str) -> str | None:
    """The replica a connection id names (Hub.new_id: REPLICA-N-HEX); None if none."""
    rest, _, tail = connection.rpartition("-")
    replica, _, number = rest.rpartition("-")
    if not (replica and number.isdigit() and len(tail) == 6):
        return None
    return replica


def describe(member: Member, replica: str) -> dict[str, Any]:
    return {
        "id": member.id,
        "replica": replica,
        "connected_at": round(member.connected_at, 3),
        "last_active_at": round(member.last_active_at, 3),
        "channels": sorted(member.channels),
    }


def check_room(channels: Collection[str], channel: str) -> None:
    """RequestError if a connection in `channels` may not join `channel` too."""
    if len(channels) >= MAX_CHANNELS and channel not in channels:
        raise RequestError(f"A connection is in {MAX_CHANNELS} channels at most.")


class Hub:
    """This replica's connections and channels; with a bus, every replica's."""

    def __init__(self, replica: str | None = None) -> None:
        self.replica = replica or replica_name()
        self.members: dict[str, Member] = {}
        self.channels: dict[str, set[Member]] = {}
        self.bus: Bus | None = None
        self._ids = itertools.count(1)

    def new_id(self) -> str:
        """An id no other connection of any replica has or had."""
        # A random part too: an id is not a secret, but need not be guessable.
        return f"{self.replica}-{next(self._ids)}-{secrets.token_hex(3)}"

    # ------------------------------------------------------- this replica

    def join(self, member: Member) -> None:
        self.members[member.id] = member
        if self.bus is not None:
            self.bus.joined(member)

    def leave(self, member: Member) -> None:
        if self.members.pop(member.id, None) is None:
            return
        for channel in member.channels:
            self._drop(channel, member)
        if self.bus is not None:
            self.bus.left(member)

    def _drop(self, channel: str, member: Member) -> None:
        subscribers = self.channels.get(channel)
        if subscribers is not None:
            subscribers.discard(member)
            if not subscribers:
                del self.channels[channel]

    def local(self, operation: dict[str, Any]) -> bool:
        """Carry out an operation on this replica's connections (from the API or the bus)."""
        op = operation["op"]
        if op == "publish" or op == "broadcast":
            everyone = self.members.values() if op == "broadcast" else self.channels.get(operation["channel"], ())
            for each in list(everyone):
                each.push(operation["data"])
            return True
        member = self.members.get(operation["id"])
        if member is None:
            return False
        if op == "send":
            return member.push(operation["data"])
        elif op == "close":
            member.end(CLOSED_BY_API)
        elif op == "subscribe":
            check_room(member.channels, operation["channel"])
            member.channels.add(operation["channel"])
            self.channels.setdefault(operation["channel"], set()).add(member)
            self._changed(member)
        elif op == "unsubscribe":
            member.channels.discard(operation["channel"])
            self._drop(operation["channel"], member)
            self._changed(member)
        return True

    def _changed(self, member: Member) -> None:
        if self.bus is not None:
            self.bus.changed(member)

    # ------------------------------------------------- any replica (the API)

    async def to_connection(self, operation: dict[str, Any]) -> bool:
        """send, close, subscribe or unsubscribe, wherever the connection is; False: it is gone."""
        if operation["id"] in self.members:
            return self.local(operation)
        if self.bus is None:
            return False
        if operation["op"] == "subscribe":
            # The cap is checked here on the record (a moment old) so the API
            # can answer 400; the owner checks it again and only logs a refusal.
            record = await self.bus.describe(operation["id"])
            if record is None:
                return False
            check_room(record["channels"], operation["channel"])
            return await self.bus.forward(record["replica"], operation)
        replica = await self.bus.owner(operation["id"])
        if replica is None:
            return False
        return await self.bus.forward(replica, operation)

    async def describe(self, connection: str) -> dict[str, Any] | None:
        member = self.members.get(connection)
        if member is not None:
            return describe(member, self.replica)
        return None if self.bus is None else await self.bus.describe(connection)

    async def to_everyone(self, operation: dict[str, Any]) -> None:
        """publish or broadcast: every replica delivers to its own connections, once.

        Through the bus this replica hears it too, as every other does. With
        the bus down, this replica's connections still get it; Unavailable
        says the others did not.
        """
        if self.bus is None:
            self.local(operation)
            return
        try:
            await self.bus.fan_out(operation)
        except Unavailable:
            self.local(operation)
            raise
