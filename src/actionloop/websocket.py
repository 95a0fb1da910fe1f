"""The WebSocket endpoint: continuous mode and graceful drain.

picows frames every WebSocket connection. The front door (listener.py) hands
it a connection whose first request is an upgrade at OW_WEBSOCKET's path; so
does aiohttp for the rare upgrade on a connection it has served before. The
rules for accepting a handshake are handshake.py's; this module parses each
message, hands it to the runtime and formats the reply (contract part B).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import sys
import time
import urllib.parse
from typing import Any

from . import events, protocol
from .errors import ActionLoopError, RequestError
from .handshake import SUBPROTOCOL, offered_subprotocols, refusal
from .picows_server import (
    PICOWS_HEAD_LIMIT,
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSProtocol,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    feed,
    head_for_picows,
    send,
)
from .runtime import Runtime, Session

GOING_AWAY = b"server shutting down"
# Bytes of messages taken off a socket while one is being answered, at most.
READ_AHEAD = 64 * 1024
# Each frame of a message, and each message waiting, counts for at least this
# many bytes against OW_WEBSOCKET_MAX_MESSAGE and READ_AHEAD: empty ones are
# bounded in number too (contract part C), at 65,536 frames a message and
# 1,024 messages waiting on the defaults.
FRAME_COST = 64
# Close codes a client may send (RFC 6455 7.4; 1012-1014 registered since).
CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)))
# Bytes of pushed messages a client may leave unread before it is closed.
PUSH_BACKLOG = 4 * 1024 * 1024
# After our close frame, how long the client has to answer it.
CLOSE_WAIT = 5.0
# The same, for the connections still open when the drain timeout is up.
LAST_CLOSE_WAIT = 1.0
READ_BUFFER = 2048
# An adapter, so picows does not make a logger for every connection.
LOGGER = logging.LoggerAdapter(logging.getLogger("actionloop.websocket"))


class Sockets:
    """The open WebSockets, and which have work in hand (for a graceful drain)."""

    def __init__(self) -> None:
        self.open: set[Conversation] = set()
        self.busy: set[Conversation] = set()
        # SIGTERM came: /readyz fails, yet connections are still taken for
        # OW_DRAIN_DELAY seconds (cli.serve_runtime); `draining` comes after.
        self.leaving = False
        self.draining = False

    async def closed(self, timeout: float) -> None:
        """Wait up to `timeout` for every connection to end (contract part C).

        Those still open then hear 1001 too, their work in hand unanswered,
        and get LAST_CLOSE_WAIT seconds to answer it before they are cut.
        """
        if self.open:
            await asyncio.wait([c.ended for c in self.open], timeout=timeout)
        late = list(self.open)
        for conversation in late:
            conversation.close(WSCloseCode.GOING_AWAY, GOING_AWAY)
        if late:
            await asyncio.wait([c.ended for c in late], timeout=LAST_CLOSE_WAIT)
        for conversation in list(self.open):
            if conversation.transport is not None:
                conversation.transport.disconnect(graceful=False)


def log_event(event: str, **fields: Any) -> None:
    """One structured (JSON) line per connection event, on stderr."""
    line = protocol.dumps({"time": round(time.time(), 3), "event": event, **fields})
    sys.stderr.write(line.decode() + "\n")
    sys.stderr.flush()


def refused(status: int, message: str, headers: dict[str, str] | None = None) -> WSUpgradeResponseWithListener:
    headers = {"Content-Type": "application/json", **(headers or {})}
    response = WSUpgradeResponse.create_error_response(status, protocol.error(message), headers)
    return WSUpgradeResponseWithListener(response, None)


def answer_handshake(
    request: WSUpgradeRequest, runtime: Runtime, sockets: Sockets, remote: str | None, connection: str = ""
) -> WSUpgradeResponseWithListener:
    """picows asks: refuse with a status, or accept with a Conversation."""
    headers = request.headers
    target = urllib.parse.urlsplit(request.path.decode("latin-1"))
    why = refusal(headers, urllib.parse.parse_qs(target.query), runtime.config, len(sockets.open), sockets.draining)
    if why is not None:
        runtime.metrics.error(why.kind)
        answer = dict(why.headers, **({"WWW-Authenticate": "Bearer"} if why.status == 401 else {}))
        return refused(why.status, why.message, answer)
    try:
        runtime.check_room()  # the process slot itself is taken in on_ws_connected
    except ActionLoopError as exc:  # connection mode: too many processes already
        runtime.metrics.error("too_many_processes")
        return refused(exc.status, exc.message)
    extra = {"Sec-WebSocket-Protocol": SUBPROTOCOL} if SUBPROTOCOL in offered_subprotocols(headers) else None
    conversation = Conversation(runtime, connection or runtime.hub.new_id(), sockets, remote, target.path)
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(extra), conversation)


def upgrade(
    transport: asyncio.Transport, head: bytes, tail: bytes, runtime: Runtime, sockets: Sockets, connection: str = ""
) -> WSProtocol | None:
    """Give a connection to picows, with the bytes read from it so far: the
    upgrade request's head, whole, and what came after it. picows answers
    the handshake, then frames it. None, and the connection untouched, if
    even the lines picows reads are too long for it (the caller answers 431).
    """
    head = head_for_picows(head)
    if len(head) >= PICOWS_HEAD_LIMIT:
        return None
    peer = transport.get_extra_info("peername")
    remote = peer[0] if isinstance(peer, tuple) else None
    ping = runtime.config.ping_interval
    ws = WSProtocol(
        None,  # host and port: a client's
        None,  # path: a client's
        False,  # client side
        lambda request: answer_handshake(request, runtime, sockets, remote, connection),
        LOGGER,
        True,  # disconnect on exception
        None,  # handshake timeout: the front door's already ran
        bool(ping),
        ping or 20,  # ping after this long without data from the client
        (ping or 20) / 2,  # and disconnect if no pong comes in this long
        WSAutoPingStrategy.PING_WHEN_IDLE,
        False,  # pings: answered by Conversation, after its checks (RFC 6455 5.2)
        runtime.config.max_message,
        None,  # extra headers
        READ_BUFFER,
    )
    transport.set_protocol(ws)
    ws.connection_made(transport)
    feed(ws, head + tail)
    return ws


class Conversation(WSListener):
    """Continuous mode on one connection: each message invokes the action and
    its reply goes back, one message at a time, in order (contract part B).

    Everything here is a callback from picows or the runtime: no task per
    message. Messages that arrive while one is being answered wait in
    `pending`; past READ_AHEAD bytes of them, or while the client is not
    reading its replies, the socket is not read, so TCP holds the client back.
    """

    def __init__(self, runtime: Runtime, connection: str, sockets: Sockets, remote: str | None, path: str) -> None:
        self.session = Session(runtime, connection, None)  # the real one comes in on_ws_connected
        self.path = path
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.sockets = sockets
        self.remote = remote
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self.loop.create_future()
        self.transport: WSTransport | None = None
        self.pending: collections.deque[tuple[WSMsgType, bytes]] = collections.deque()
        self.pending_bytes = 0
        self.parts: list[bytes] = []  # a fragmented message so far
        self.parts_type: WSMsgType | None = None  # while one is coming
        self.parts_bytes = 0
        self.parts_text: codecs.IncrementalDecoder | None = None  # checks a text message's UTF-8 as it comes
        self.busy = False
        self.reply_type = WSMsgType.TEXT
        self.pumping = False
        self.writing_paused = False
        self.reading_paused = False
        self.closing = False
        self.close_code: int | None = None
        self.opened = time.monotonic()
        self.connected_at = time.time()
        self.channels: set[str] = set()  # of the management API (hub.py)
        self.last = self.loop.time()
        self.idle: asyncio.TimerHandle | None = None
        self.ready = False  # the session's own process, if it has one, is up
        self.tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ picows side

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.sockets.open.add(self)
        self.metrics.connections += 1
        self.metrics.opened += 1
        # A process slot (connection mode) is taken only now that picows has
        # accepted the handshake, so one it refuses after answer_handshake
        # holds none (contract part C); answer_handshake checked for room in
        # this same call, so there is room.
        self.session = self.runtime.session(self.session.connection)
        timeout = self.runtime.config.idle_timeout
        if timeout:
            self.idle = self.loop.call_later(timeout, self._idle_check)
        log_event("websocket_open", connection=self.session.connection, remote=self.remote, path=self.path)
        self.runtime.hub.join(self)
        if self.session.own:
            self._spawn(self._open())
        else:
            self.ready = True

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self) -> None:
        """Start the session (connection mode: its process); messages wait till then."""
        try:
            await self.session.open()
        except ActionLoopError as exc:
            self.metrics.error("start_failed")
            self.close(WSCloseCode.INTERNAL_ERROR, exc.message.encode()[:120])
            return
        self.ready = True
        self._pump()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """One frame; picows has checked opcodes, masking and control frames (RFC 6455 5)."""
        kind = frame.msg_type
        if (
            (kind is WSMsgType.TEXT or kind is WSMsgType.BINARY)
            and frame.fin
            and self.parts_type is None
            and not (frame.rsv1 or frame.rsv2 or frame.rsv3 or self.closing)
        ):
            self._take(kind, frame.get_payload_as_bytes())  # the usual case: a whole message
        elif frame.rsv1 or frame.rsv2 or frame.rsv3:
            if not self.closing:
                self._fail(WSCloseCode.PROTOCOL_ERROR, b"reserved bits set, no extension was agreed")
        elif kind is WSMsgType.CLOSE:
            self._close_frame(transport, frame)
        elif self.closing:
            return  # after our close frame, data is ignored (RFC 6455 1.4)
        elif kind is WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if self.parts_type is not None:
                self._fail(WSCloseCode.PROTOCOL_ERROR, b"a new message inside a fragmented one")
            elif frame.fin:
                self._take(kind, frame.get_payload_as_bytes())
            else:
                self.parts_type = kind
                if kind is WSMsgType.TEXT:
                    self.parts_text = codecs.getincrementaldecoder("utf-8")()
                self._add_part(frame)
        elif kind is WSMsgType.CONTINUATION:
            if self.parts_type is None:
                self._fail(WSCloseCode.PROTOCOL_ERROR, b"a continuation frame with nothing to continue")
            else:
                self._add_part(frame)

    def _close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """The client's close: echo its code, 1000 for an empty one, 1002 for an invalid one (RFC 6455 5.5.1, 7.4)."""
        payload = frame.get_payload_as_bytes()
        code = int.from_bytes(payload[:2], "big") if payload else WSCloseCode.OK.value
        if self.close_code is None:
            self.close_code = code if payload else None
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode(code) if code in CLOSE_CODES else WSCloseCode.PROTOCOL_ERROR)
        transport.disconnect()

    def _fail(self, code: WSCloseCode, reason: bytes) -> None:
        """The client broke RFC 6455: close with `code`, forget the message in progress."""
        self.metrics.error("protocol_error")
        self._forget_parts()
        self.close(code, reason)

    def _forget_parts(self) -> None:
        self.parts.clear()
        self.parts_type = self.parts_text = None
        self.parts_bytes = 0

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.sockets.busy.discard(self)
        self.metrics.connections -= 1
        self.pending.clear()
        self.runtime.hub.leave(self)
        if self.runtime.config.events:
            value = events.disconnect(self.id, self.close_code)
            body = protocol.message_body(value, self.runtime.activation_meta(self.id))
            self.runtime.activate_event(body)
        self._spawn(self._end())
        log_event(
            "websocket_close",
            connection=self.session.connection,
            code=self.close_code,
            seconds=round(time.monotonic() - self.opened, 3),
        )

    async def _end(self) -> None:
        """After the last message: stop the session's own process, if any."""
        try:
            await asyncio.gather(*(t for t in self.tasks if t is not asyncio.current_task()))
            await self.session.close()
        finally:
            self.sockets.open.discard(self)
            self.ended.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._flow()

    def _add_part(self, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        self.parts_bytes += max(len(payload), FRAME_COST)
        if self.parts_bytes > self.runtime.config.max_message:
            self._forget_parts()
            self.close(WSCloseCode.MESSAGE_TOO_BIG, b"message too big")
            return
        if self.parts_text is not None:
            try:
                self.parts_text.decode(payload, frame.fin)
            except UnicodeDecodeError:
                self._fail(WSCloseCode.INVALID_TEXT, b"invalid UTF-8 in a text message")
                return
        self.parts.append(payload)
        if frame.fin:
            kind, data = self.parts_type, b"".join(self.parts)
            self._forget_parts()
            assert kind is not None
            self._take(kind, data)

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
        size = len(data)
        self.pending_bytes += size if size > FRAME_COST else FRAME_COST
        if self.pending_bytes > READ_AHEAD:
            self._flow()
        self._pump()

    def _pump(self) -> None:
        if self.pumping:
            return  # a reply came back at once: the loop below goes on
        self.pumping = True
        try:
            while self.pending and self.ready and not self.busy and not self.closing:
                kind, data = self.pending.popleft()
                size = len(data)
                self.pending_bytes -= size if size > FRAME_COST else FRAME_COST
                self.busy = True
                self.reply_type = kind  # the reply goes in the frame type of the message
                self.sockets.busy.add(self)
                self.metrics.in_flight += 1
                self._activate(data)
        finally:
            self.pumping = False
        if self.reading_paused:
            self._flow()

    def _activate(self, data: bytes) -> None:
        """One message: JSON in, to the action; a reply comes back through `_answered`."""
        try:
            value = protocol.loads(data)
        except protocol.JSON_ERRORS as exc:
            if self.reply_type is WSMsgType.TEXT and not is_utf8(data):
                # Invalid UTF-8 in a text message fails the connection (RFC 6455 8.1);
                # checked only here, as valid JSON is valid UTF-8.
                self._fail(WSCloseCode.INVALID_TEXT, b"invalid UTF-8 in a text message")
                self._reply(b"")  # goes nowhere: the close frame is out
                return
            self.metrics.error("bad_json")
            self._answered(RequestError(f"The message is not valid JSON: {exc}"))
            return
        self.session.activate(value, self._answered)

    def _answered(self, outcome: bytes | ActionLoopError) -> None:
        """The action's result goes back as it is; an error as `{"error": ...}`."""
        self._reply(protocol.error(outcome.message) if isinstance(outcome, ActionLoopError) else outcome)

    def _reply(self, data: bytes) -> None:
        self.metrics.in_flight -= 1
        self.busy = False
        self.sockets.busy.discard(self)
        self.last = self.loop.time()
        transport = self.transport
        assert transport is not None
        if transport.is_disconnected or transport.is_close_frame_sent:
            return  # the client vanished before its reply; nobody else is affected
        send(transport, self.reply_type, data)
        self.metrics.sent += 1
        if self.sockets.draining:
            # The in-flight reply is out; now say goodbye (contract part C).
            self.close(WSCloseCode.GOING_AWAY, GOING_AWAY)
        else:
            self._pump()

    # ------------------------------------------------ the hub's (hub.Member)

    @property
    def id(self) -> str:
        return self.session.connection

    @property
    def last_active_at(self) -> float:
        """When the last message came in, or its reply went out (epoch seconds)."""
        return time.time() - (self.loop.time() - self.last)

    def push(self, data: bytes) -> bool:
        """A message from the management API, not a reply: it goes out now, as
        text. False if it cannot: the connection is closing.

        A client whose unread messages pile up past PUSH_BACKLOG is closed
        with 1008 rather than held in memory (contract part C: bounded).
        """
        transport = self.transport
        if transport is None or self.closing or transport.is_disconnected:
            return False
        if self.writing_paused and transport.underlying_transport.get_write_buffer_size() > PUSH_BACKLOG:
            self.metrics.error("too_slow")
            self.close(WSCloseCode.POLICY_VIOLATION, b"too slow to read its messages")
            return False
        send(transport, WSMsgType.TEXT, data)
        self.metrics.sent += 1
        return True

    def end(self, reason: bytes) -> None:
        self.close(WSCloseCode.OK, reason)

    # ------------------------------------------------------------ the closing

    def close(self, code: WSCloseCode, reason: bytes) -> None:
        """Send a close frame; the client's answer, or CLOSE_WAIT, ends the connection."""
        transport = self.transport
        if transport is None or self.closing or transport.is_disconnected:
            return
        self.closing = True
        self.close_code = code.value
        self.runtime.hub.leave(self)  # from now on the API reads it as gone (410)
        transport.send_close(code, reason)
        # Not graceful: a client that reads nothing would hold its unsent
        # bytes, and its place, for ever.
        self.loop.call_later(CLOSE_WAIT, transport.disconnect, False)

    def _idle_check(self) -> None:
        """Close after `idle_timeout` s with no message; waiting on a slow reply is not idleness."""
        timeout = self.runtime.config.idle_timeout
        remaining = timeout if self.busy else self.last + timeout - self.loop.time()
        if remaining > 0:
            self.idle = self.loop.call_later(remaining, self._idle_check)
        else:
            self.idle = None
            self.close(WSCloseCode.OK, b"idle timeout")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def drain(sockets: Sockets) -> None:
    """On shutdown, idle WebSockets hear 1001 (going away) now; busy ones after their replies."""
    sockets.leaving = sockets.draining = True
    for conversation in list(sockets.open - sockets.busy):
        conversation.close(WSCloseCode.GOING_AWAY, GOING_AWAY)
