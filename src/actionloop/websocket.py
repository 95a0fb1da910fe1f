"""The WebSocket endpoint: handshake checks, continuous mode, graceful drain.

Handshake (SPEC.md parts B and C), refused before the upgrade:
  403 another site's Origin; 401 no token / 403 wrong token (when one is set);
  503 too many connections, too many per-connection processes, or draining.

Conversation: messages are answered one by one, in order. While a message is
being answered nothing more is taken off the socket: aiohttp reads ahead at
most 64 KiB per connection and then stops reading, so a client far ahead is
held back by TCP instead of being buffered without bound. A client that never
reads its replies stalls only its own conversation, the same way.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import logging
import sys
import time
from typing import Any

from aiohttp import web
from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol
from yarl import URL

from . import protocol
from .config import Config
from .errors import ActionLoopError
from .runtime import Runtime, Session

SUBPROTOCOL = "actionloop"
TOKEN_SUBPROTOCOL = "bearer."
GOING_AWAY = b"server shutting down"
# Bytes of messages taken off a socket while one is being answered, at most.
READ_AHEAD = 64 * 1024
# After our close frame, how long the client has to answer it.
CLOSE_WAIT = 5.0
READ_BUFFER = 2048
# An adapter, so picows does not make a logger for every connection.
LOGGER = logging.LoggerAdapter(logging.getLogger("actionloop.websocket"))
_ids = itertools.count(1)


class Sockets:
    """The open WebSockets, and which have work in hand (for a graceful drain)."""

    def __init__(self) -> None:
        self.open: set[Conversation] = set()
        self.busy: set[Conversation] = set()
        self.draining = False


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Compare the browser's Origin (not Host) with the allow-list (SPEC.md B).

    An entry with a scheme must match scheme, host and port; a bare host name
    matches that host on any scheme and port. No Origin: not a browser, allowed.
    """
    if not allowed or origin is None:
        return True
    try:
        url = URL(origin)
    except ValueError:
        return False
    if not url.host:
        return False
    for entry in allowed:
        if "://" in entry:
            wanted = URL(entry)
            if (wanted.scheme, wanted.host, wanted.port) == (url.scheme, url.host, url.port):
                return True
        elif entry.lower() == url.host.lower():
            return True
    return False


def presented_token(request: web.Request) -> str | None:
    """The token from `Authorization: Bearer`, `?token=`, or a `bearer.` subprotocol.

    Browsers cannot set headers on a WebSocket, hence the other two ways.
    """
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    if "token" in request.query:
        return request.query["token"]
    for offered in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        if offered.strip().startswith(TOKEN_SUBPROTOCOL):
            return offered.strip()[len(TOKEN_SUBPROTOCOL) :]
    return None


def refusal(request: web.Request, config: Config, sockets: Sockets) -> tuple[int, str, str] | None:
    """Why this handshake is refused (status, message, metric kind), or None."""
    if not origin_allowed(request.headers.get("Origin"), config.origins):
        return 403, "This origin may not open a WebSocket here.", "origin_refused"
    if config.token:
        token = presented_token(request)
        if token is None:
            return 401, "A token is required: Authorization: Bearer, ?token= or a bearer. subprotocol.", "unauthorized"
        if not hmac.compare_digest(token.encode(), config.token.encode()):
            return 403, "The token is not valid.", "unauthorized"
    if sockets.draining:
        return 503, "The server is shutting down.", "draining"
    if len(sockets.open) >= config.max_connections:
        return 503, "Too many connections; try again later.", "too_many_connections"
    return None


def log_event(event: str, **fields: Any) -> None:
    """One structured (JSON) line per connection event, on stderr."""
    line = protocol.dumps({"time": round(time.time(), 3), "event": event, **fields})
    sys.stderr.write(line.decode() + "\n")
    sys.stderr.flush()


async def handle(request: web.Request, runtime: Runtime, sockets: Sockets) -> web.StreamResponse:
    """Check the handshake in aiohttp, then give the connection to picows."""
    config = runtime.config
    refused = refusal(request, config, sockets)
    if refused is not None:
        status, message, kind = refused
        runtime.metrics.error(kind)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.Response(
            body=protocol.error(message), status=status, content_type="application/json", headers=headers
        )
    ready = web.WebSocketResponse(protocols=(SUBPROTOCOL,)).can_prepare(request)
    if not ready.ok:
        return web.Response(
            body=protocol.error("This path takes WebSocket connections only."), status=400, content_type="application/json"
        )
    connection = f"ws-{next(_ids)}"
    try:
        async with runtime.session(connection) as session:
            conversation = Conversation(session, sockets, request.remote, request.path)
            hand_over(request, conversation, ready.protocol)
            await conversation.ended
    except ActionLoopError as exc:  # connection mode: no process for this client
        runtime.metrics.error("too_many_processes" if exc.status == 503 else "start_failed")
        return web.Response(body=protocol.error(exc.message), status=exc.status, content_type="application/json")
    # picows owned the connection and has closed it: aiohttp lets it go
    # without writing anything more (its write fails on the closed transport).
    request.protocol.connection_lost(None)
    return web.Response()


def hand_over(request: web.Request, conversation: Conversation, subprotocol: str | None) -> None:
    """Move the connection from aiohttp to picows, which frames it from now on.

    aiohttp has parsed and checked the upgrade request; picows is given the
    same request bytes and answers 101 itself. Client frames only follow the
    101, so nothing can be in aiohttp's buffers yet.
    """
    config = conversation.runtime.config
    headers = (("Sec-WebSocket-Protocol", subprotocol),) if subprotocol else None
    response = WSUpgradeResponse.create_101_response(extra_headers=headers)
    ping = config.ping_interval
    ws = WSProtocol(
        None,  # host and port: a client's
        None,  # path: a client's
        False,  # client side
        lambda _request: WSUpgradeResponseWithListener(response, conversation),
        LOGGER,
        True,  # disconnect on exception
        None,  # handshake timeout: aiohttp's already ran
        bool(ping),
        ping or 20,  # ping after this long without data from the client
        (ping or 20) / 2,  # and disconnect if no pong comes in this long
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # answer pings
        config.max_message,
        None,  # extra headers
        READ_BUFFER,
    )
    transport = request.transport
    assert transport is not None
    head = [f"GET {request.raw_path} HTTP/1.1\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in request.raw_headers]
    data = b"".join(head) + b"\r\n"
    transport.set_protocol(ws)
    ws.connection_made(transport)
    buffer = ws.get_buffer(len(data))
    buffer[: len(data)] = data
    ws.buffer_updated(len(data))


class Conversation(WSListener):
    """Continuous mode on one connection: each message invokes the action and
    its reply goes back, one message at a time, in order (SPEC.md part B).

    Everything here is a callback from picows or the runtime: no task per
    message. Messages that arrive while one is being answered wait in
    `pending`; past READ_AHEAD bytes of them, or while the client is not
    reading its replies, the socket is not read, so TCP holds the client back.
    """

    def __init__(self, session: Session, sockets: Sockets, remote: str | None, path: str) -> None:
        self.session = session
        self.path = path
        self.runtime = session.runtime
        self.metrics = session.runtime.metrics
        self.sockets = sockets
        self.remote = remote
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self.loop.create_future()
        self.transport: WSTransport | None = None
        self.pending: collections.deque[tuple[WSMsgType, bytes]] = collections.deque()
        self.pending_bytes = 0
        self.parts: list[bytes] = []  # a fragmented message so far
        self.parts_type = WSMsgType.TEXT
        self.parts_bytes = 0
        self.busy = False
        self.reply_type = WSMsgType.TEXT
        self.pumping = False
        self.writing_paused = False
        self.reading_paused = False
        self.closing = False
        self.close_code: int | None = None
        self.opened = time.monotonic()
        self.last = self.loop.time()
        self.idle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ picows side

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.sockets.open.add(self)
        self.metrics.connections += 1
        self.metrics.opened += 1
        timeout = self.runtime.config.idle_timeout
        if timeout:
            self.idle = self.loop.call_later(timeout, self._idle_check)
        log_event(
            "websocket_open", connection=self.session.connection, remote=self.remote, path=self.path
        )

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if frame.fin and not self.parts:
                self._take(kind, frame.get_payload_as_bytes())
            else:
                self.parts_type = kind
                self._add_part(frame)
        elif kind is WSMsgType.CONTINUATION:
            self._add_part(frame)
        elif kind is WSMsgType.CLOSE:
            if self.close_code is None:
                self.close_code = frame.get_close_code().value
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.sockets.open.discard(self)
        self.sockets.busy.discard(self)
        self.metrics.connections -= 1
        self.pending.clear()
        log_event(
            "websocket_close",
            connection=self.session.connection,
            code=self.close_code,
            seconds=round(time.monotonic() - self.opened, 3),
        )
        if not self.ended.done():
            self.ended.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._flow()

    def _add_part(self, frame: WSFrame) -> None:
        self.parts.append(frame.get_payload_as_bytes())
        self.parts_bytes += frame.payload_size
        if self.parts_bytes > self.runtime.config.max_message:
            self.parts.clear()
            self.close(WSCloseCode.MESSAGE_TOO_BIG, b"message too big")
        elif frame.fin:
            data = b"".join(self.parts)
            self.parts.clear()
            self.parts_bytes = 0
            self._take(self.parts_type, data)

    def _flow(self) -> None:
        """Read from the client only while it reads its replies and little is waiting."""
        assert self.transport is not None
        pause = self.writing_paused or self.pending_bytes > READ_AHEAD
        if pause != self.reading_paused and not self.transport.is_disconnected:
            self.reading_paused = pause
            socket = self.transport.underlying_transport
            socket.pause_reading() if pause else socket.resume_reading()

    # ----------------------------------------------------------- the messages

    def _take(self, kind: WSMsgType, data: bytes) -> None:
        if self.closing:
            return
        self.metrics.received += 1
        self.pending.append((kind, data))
        self.pending_bytes += len(data)
        if self.pending_bytes > READ_AHEAD:
            self._flow()
        self._pump()

    def _pump(self) -> None:
        if self.pumping:
            return  # a reply came back at once: the loop below goes on
        self.pumping = True
        try:
            while self.pending and not self.busy and not self.closing:
                kind, data = self.pending.popleft()
                self.pending_bytes -= len(data)
                self.busy = True
                self.reply_type = kind  # the reply goes in the frame type of the message
                self.sockets.busy.add(self)
                self.metrics.in_flight += 1
                self.session.message(data, self._reply)
        finally:
            self.pumping = False
        if self.reading_paused:
            self._flow()

    def _reply(self, data: bytes) -> None:
        self.metrics.in_flight -= 1
        self.busy = False
        self.sockets.busy.discard(self)
        self.last = self.loop.time()
        transport = self.transport
        assert transport is not None
        if transport.is_disconnected or transport.is_close_frame_sent:
            return  # the client vanished before its reply; nobody else is affected
        transport.send(self.reply_type, data)
        self.metrics.sent += 1
        if self.sockets.draining:
            # The in-flight reply is out; now say goodbye (SPEC.md part C).
            self.close(WSCloseCode.GOING_AWAY, GOING_AWAY)
        else:
            self._pump()

    # ------------------------------------------------------------ the closing

    def close(self, code: WSCloseCode, reason: bytes) -> None:
        """Send a close frame; the client's answer, or CLOSE_WAIT, ends the connection."""
        transport = self.transport
        if transport is None or self.closing or transport.is_disconnected:
            return
        self.closing = True
        self.close_code = code.value
        transport.send_close(code, reason)
        self.loop.call_later(CLOSE_WAIT, transport.disconnect)

    def _idle_check(self) -> None:
        """Close after `idle_timeout` s with no message; waiting on a slow reply is not idleness."""
        timeout = self.runtime.config.idle_timeout
        remaining = timeout if self.busy else self.last + timeout - self.loop.time()
        if remaining > 0:
            self.idle = self.loop.call_later(remaining, self._idle_check)
        else:
            self.idle = None
            self.close(WSCloseCode.OK, b"idle timeout")


def drain(sockets: Sockets) -> None:
    """On shutdown, idle WebSockets hear 1001 (going away) now; busy ones after their replies."""
    sockets.draining = True
    for conversation in list(sockets.open - sockets.busy):
        conversation.close(WSCloseCode.GOING_AWAY, GOING_AWAY)
