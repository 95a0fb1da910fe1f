"""The front door: one port for HTTP and WebSocket (contract part B).

It reads the head of each connection's first request. An upgrade to a
WebSocket at OW_WEBSOCKET's path goes straight to picows (websocket.py);
everything else goes to aiohttp (server.py), imported on first use. Importing
aiohttp takes longer than the rest of start-up together (mostly the TLS setup
of its HTTP client, which we never use), and a pod serving WebSockets need not
pay for it before its first answer. With no WebSocket path it loads at once.

What a client can make it hold is bounded (contract part C; README: Limits):
a head of HEAD_LIMIT bytes (431 beyond, never silence), sent within
OW_HEAD_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import http
from typing import TYPE_CHECKING

from multidict import CIMultiDict  # loaded with picows already

from . import events, protocol, websocket
from .errors import ActionLoopError
from .handshake import refusal
from .runtime import Runtime, log
from .websocket import Sockets

if TYPE_CHECKING:
    from aiohttp import web

# The largest request head (request line and headers): 431 beyond. As
# nginx's default (4 buffers of 8 KiB), so browsers with many cookies pass;
# aiohttp takes lines this long too (server.py).
HEAD_LIMIT = 32 * 1024
HEAD_TOO_LARGE = f"The request head is larger than {HEAD_LIMIT} bytes."
UPGRADE_TOO_LARGE = "The WebSocket request's URL and headers are too long."
# After a refusal, how long what the client still sends is read and dropped.
LINGER = 5.0


class Endpoints:
    """What the front door hands connections to: picows, or aiohttp once loaded."""

    def __init__(self, runtime: Runtime, sockets: Sockets) -> None:
        self.runtime = runtime
        self.sockets = sockets
        self.web: web.AppRunner | None = None  # aiohttp's, once loaded
        self._loading: asyncio.Future[None] | None = None

    def load(self) -> asyncio.Future[None]:
        """Import aiohttp and build the app, once it works: a failure (no
        descriptors left at that moment, say) is logged, and tried again next time."""
        if self._loading is None or (self._loading.done() and self.web is None):
            self._loading = asyncio.ensure_future(self._load())
            self._loading.add_done_callback(self._loaded)
        return self._loading

    async def _load(self) -> None:
        from . import server

        self.web = await server.make_runner(self.runtime, self.sockets)

    def _loaded(self, loading: asyncio.Future[None]) -> None:
        if not loading.cancelled() and loading.exception() is not None:
            log(f"actionloop: cannot load the HTTP side: {loading.exception()!r}")

    def to_web(self, transport: asyncio.Transport, data: bytes) -> None:
        if self.web is not None:
            self._give(transport, data)
            return
        transport.pause_reading()
        self.load().add_done_callback(lambda _: self._give(transport, data, paused=True))

    def _give(self, transport: asyncio.Transport, data: bytes, paused: bool = False) -> None:
        if transport.is_closing():
            return
        if paused:
            transport.resume_reading()  # what comes next goes to the protocol set below
        if self.web is None or self.web.server is None:  # aiohttp failed to load (logged)
            refuse(transport, 503, "The HTTP side could not start; try again.")
            return
        handler = self.web.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(data)

    def acceptable(self, head: bytes) -> bool:
        """Whether our handshake rules (handshake.py) let this upgrade through;
        picows answers those they refuse, with no action invoked."""
        headers, query = events.head_fields(head)
        fields = CIMultiDict(headers)
        found = refusal(
            fields,
            {k: [v] for k, v in query.items()},
            self.runtime.config,
            len(self.sockets.open),
            self.sockets.draining,
        )
        return found is None

    def connect_event(self, transport: asyncio.Transport, head: bytes, tail: bytes) -> None:
        """Invoke the action with the connect event, then upgrade or refuse as it says (contract part D)."""
        runtime = self.runtime
        connection = runtime.hub.new_id()
        transport.pause_reading()

        def answered(outcome: bytes | ActionLoopError) -> None:
            if transport.is_closing():
                return
            transport.resume_reading()
            refused = events.refusal(outcome)
            if refused is None:
                upgrade(transport, head, tail, self, connection)
            else:
                runtime.metrics.error("refused_by_action")
                answer(transport, refused.status, refused.body, refused.content_type)

        body = protocol.message_body(events.connect(connection, head), runtime.activation_meta(connection))
        runtime.activate(body, runtime.config.message_timeout or None, answered)

    async def close(self) -> None:
        """After the listener stopped: aiohttp finishes its requests (up to the drain timeout)."""
        if self._loading is not None:
            await asyncio.wait([self._loading])
        if self.web is not None:
            await self.web.cleanup()


class FirstRequest(asyncio.Protocol):
    """One new connection, until its first request head says where it goes."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # a TCP transport
        timeout = self.endpoints.runtime.config.head_timeout  # contract part C: slow requests are bounded
        self.timer = asyncio.get_running_loop().call_later(timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        self.head += data
        head, blank, tail = self.head.partition(b"\r\n\r\n")
        if not blank and len(self.head) <= HEAD_LIMIT:
            return
        transport, endpoints = self.transport, self.endpoints
        assert transport is not None and self.timer is not None
        self.timer.cancel()
        head += blank
        if not blank or len(head) > HEAD_LIMIT:
            refuse(transport, 431, HEAD_TOO_LARGE)
        elif not is_upgrade(head, endpoints.runtime.config.websocket):
            endpoints.to_web(transport, self.head)
        elif endpoints.runtime.config.events and endpoints.acceptable(head):
            endpoints.connect_event(transport, head, tail)
        else:
            upgrade(transport, head, tail, endpoints)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


def upgrade(transport: asyncio.Transport, head: bytes, tail: bytes, endpoints: Endpoints, connection: str = "") -> None:
    if websocket.upgrade(transport, head, tail, endpoints.runtime, endpoints.sockets, connection) is None:
        refuse(transport, 431, UPGRADE_TOO_LARGE)


def refuse(transport: asyncio.Transport, status: int, message: str) -> None:
    """Answer a request that goes no further, with a JSON error, and close."""
    answer(transport, status, protocol.error(message))


def answer(transport: asyncio.Transport, status: int, body: bytes, content_type: str = "application/json") -> None:
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Refused"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    transport.write(head % (status, reason, content_type.encode(), len(body)) + body)
    transport.set_protocol(Lingering(transport))


class Lingering(asyncio.Protocol):
    """After a refusal: read what the client still sends, for LINGER seconds
    at most, and drop it. Closing with unread bytes would reset the
    connection, and the client could lose the answer (nginx's lingering close)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


def is_upgrade(head: bytes, path: str) -> bool:
    """A GET of `path` asking for a WebSocket: the only thing picows is given.

    Just a sniff: picows parses and checks the request in full.
    """
    if not path:
        return False
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[1].split(b"?", 1)[0] != path.encode():
        return False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


async def listen(endpoints: Endpoints) -> asyncio.Server:
    """Listen on the configured host and port; OSError if that cannot be."""
    config = endpoints.runtime.config
    if not config.websocket:
        await endpoints.load()  # plain OpenWhisk: every request is aiohttp's
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FirstRequest(endpoints), config.host, config.port, reuse_address=True)
