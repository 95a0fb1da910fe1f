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
import hmac
import itertools
import sys
import time
from typing import Any

from aiohttp import WSCloseCode, web
from yarl import URL

from . import protocol
from .config import Config
from .errors import ActionLoopError
from .runtime import Runtime, Session

SUBPROTOCOL = "actionloop"
TOKEN_SUBPROTOCOL = "bearer."
GOING_AWAY = b"server shutting down"
_ids = itertools.count(1)


class Sockets:
    """The open WebSockets, and which have work in hand (for a graceful drain)."""

    def __init__(self) -> None:
        self.open: set[web.WebSocketResponse] = set()
        self.busy: set[web.WebSocketResponse] = set()
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
    config = runtime.config
    refused = refusal(request, config, sockets)
    if refused is not None:
        status, message, kind = refused
        runtime.metrics.errors.labels(kind).inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.Response(
            body=protocol.error(message), status=status, content_type="application/json", headers=headers
        )
    connection = f"ws-{next(_ids)}"
    try:
        async with runtime.session(connection) as session:
            return await converse(request, session, sockets)
    except ActionLoopError as exc:  # connection mode: no process for this client
        runtime.metrics.errors.labels("too_many_processes" if exc.status == 503 else "start_failed").inc()
        return web.Response(body=protocol.error(exc.message), status=exc.status, content_type="application/json")


async def converse(request: web.Request, session: Session, sockets: Sockets) -> web.WebSocketResponse:
    """Continuous mode: each message invokes the action, the reply comes back."""
    runtime = session.runtime
    config = runtime.config
    metrics = runtime.metrics
    ws = web.WebSocketResponse(
        max_msg_size=config.max_message, heartbeat=config.ping_interval or None, protocols=(SUBPROTOCOL,)
    )
    await ws.prepare(request)
    sockets.open.add(ws)
    metrics.connections.inc()
    metrics.opened.inc()
    opened = time.monotonic()
    log_event("websocket_open", connection=session.connection, remote=request.remote, path=request.path)
    idle = IdleTimer(ws, config.idle_timeout)
    try:
        async for msg in ws:  # ends on CLOSE, or ERROR (oversized: closed with 1009)
            sockets.busy.add(ws)
            idle.busy = True
            metrics.received.inc()
            metrics.in_flight.inc()
            try:
                await reply_to(ws, msg, session)
            finally:
                metrics.in_flight.dec()
                sockets.busy.discard(ws)
                idle.touch()
            if sockets.draining:
                # The in-flight reply is out; now say goodbye (SPEC.md part C).
                await ws.close(code=WSCloseCode.GOING_AWAY, message=GOING_AWAY)
    finally:
        idle.cancel()
        sockets.open.discard(ws)
        metrics.connections.dec()
        log_event(
            "websocket_close",
            connection=session.connection,
            code=ws.close_code,
            seconds=round(time.monotonic() - opened, 3),
        )
    return ws


class IdleTimer:
    """Closes a connection after `timeout` s with no message (1000, "idle timeout").

    Messages only record the time; the timer re-arms itself when it fires
    early, so the hot path pays one assignment, not a timer per message.
    """

    def __init__(self, ws: web.WebSocketResponse, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.busy = False  # waiting on a slow reply is not idleness
        self.handle = self.loop.call_later(timeout, self._fire) if timeout else None

    def touch(self) -> None:
        self.last = self.loop.time()
        self.busy = False

    def _fire(self) -> None:
        remaining = self.timeout if self.busy else self.last + self.timeout - self.loop.time()
        if remaining > 0:
            self.handle = self.loop.call_later(remaining, self._fire)
        else:
            self.handle = None
            self.task = asyncio.ensure_future(self.ws.close(code=WSCloseCode.OK, message=b"idle timeout"))

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


async def reply_to(ws: web.WebSocketResponse, msg: Any, session: Session) -> None:
    # The reply is UTF-8 JSON bytes already: sent as is, in the frame type of
    # the message (a binary frame of UTF-8 JSON is served alike).
    reply = await session.message(msg.data)
    try:
        await ws.send_frame(reply, msg.type)
    except ConnectionError:
        return  # the client vanished before its reply; nobody else is affected
    session.runtime.metrics.sent.inc()


async def drain(sockets: Sockets) -> None:
    """On shutdown, idle WebSockets hear 1001 (going away) now; busy ones after their replies."""
    sockets.draining = True
    idle = sockets.open - sockets.busy
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=GOING_AWAY) for ws in idle))
