"""HTTP: /init and /run, health, metrics, the demo page. Thin translation only.

Every decision lives in the runtime; this module turns requests into runtime
calls and runtime answers (or errors) into responses (contract parts A and B).
The front door (listener.py) hands aiohttp every connection that does not
open with a WebSocket upgrade.
"""

from __future__ import annotations

import asyncio
import html
import logging
import urllib.parse
from importlib import resources

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import payloads, protocol, websocket
from .config import Config
from .errors import ActionLoopError, TooLarge, TooSlow
from .handshake import request_refusal
from .listener import HEAD_LIMIT, LINGER, UPGRADE_TOO_LARGE
from .metrics import CONTENT_TYPE
from .runtime import Runtime
from .websocket import Sockets


class OneLine(logging.Filter):
    """A malformed request is the client's doing: one warning line, no
    traceback (aiohttp logs its parse errors as exceptions); our own
    failures keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = " ".join(error.message.split()).removesuffix(" ^")  # aiohttp points at the fault
            record.msg, record.args, record.exc_info = "%s: %s %s", (record.getMessage(), error.code, reason), None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


LOGGER = logging.getLogger("actionloop.http")  # aiohttp's server logs through it
LOGGER.addFilter(OneLine())
RUNTIME = web.AppKey("runtime", Runtime)
SOCKETS = web.AppKey("sockets", Sockets)
JSON = "application/json"


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


def error_response(exc: ActionLoopError, request: web.Request) -> web.Response:
    response = json_response(protocol.error(exc.message), exc.status)
    if not request.content.is_eof():
        response.force_close()  # the rest of the body is not worth reading
    return response


async def read_body(request: web.Request) -> bytes:
    """The body as it comes: TooLarge past OW_MAX_BODY, TooSlow if it stalls
    for OW_BODY_TIMEOUT (a total limit would fail large bodies on slow links)."""
    timeout = request.app[RUNTIME].config.body_timeout
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await request.content.readany()
        except TimeoutError as exc:
            raise TooSlow(f"The request body stalled for {timeout:g} s.") from exc
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > request.client_max_size:
            raise TooLarge(f"The request body is larger than {request.client_max_size} bytes.")
        chunks.append(chunk)


def refused(request: web.Request) -> web.Response | None:
    """/init and /run follow the WebSocket's origin and token rules (handshake.py)."""
    runtime = request.app[RUNTIME]
    why = request_refusal(request.headers, urllib.parse.parse_qs(request.query_string), runtime.config)
    if why is None:
        return None
    runtime.metrics.error(why.kind)
    response = json_response(protocol.error(why.message), why.status)
    if why.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def handle_init(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if (refusal := refused(request)) is not None:
        return refusal
    try:
        runtime.check_can_init()
        await runtime.init(payloads.parse_init(await read_body(request)))
    except ActionLoopError as exc:
        return error_response(exc, request)
    return json_response(protocol.OK)


async def handle_run(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if (refusal := refused(request)) is not None:
        return refusal
    try:
        body = payloads.parse_run(await read_body(request))
        return json_response(await runtime.run(body))
    except ActionLoopError as exc:
        return error_response(exc, request)


async def handle_websocket(request: web.Request) -> web.StreamResponse:
    """An upgrade on a connection that aiohttp served before (a proxy reusing
    it): picows takes the connection over, from the same request bytes."""
    transport = request.transport
    if transport is None:
        return web.Response()
    version = request.version
    head = [f"{request.method} {request.raw_path} HTTP/{version.major}.{version.minor}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in request.raw_headers]
    # What came after the head (frames the client sent with the upgrade):
    # aiohttp keeps it there for its own WebSocket (aiohttp 3.x), and stops
    # reading once it holds 64 KiB; picows gets it all, and reads on.
    tail = request.protocol._message_tail
    if not transport.is_reading():
        transport.resume_reading()
    ws = websocket.upgrade(transport, b"".join(head) + b"\r\n", tail, request.app[RUNTIME], request.app[SOCKETS])
    if ws is None:
        response = json_response(protocol.error(UPGRADE_TOO_LARGE), 431)
        response.force_close()
        return response
    await ws.transport.wait_disconnected()
    # The connection was picows' and is closed: aiohttp lets it go without
    # writing anything more (its write fails on the closed transport).
    request.protocol.connection_lost(None)
    return web.Response()


async def handle_metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def handle_live(request: web.Request) -> web.Response:
    """Liveness: the server answers and its action can run (or be restarted)."""
    runtime = request.app[RUNTIME]
    live = runtime.live
    state = {"live": live, "initialized": runtime.initialized}
    return json_response(protocol.dumps(state), 200 if live else 503)


async def handle_ready(request: web.Request) -> web.Response:
    """Readiness: an action is initialised and no SIGTERM came (it fails at
    once, while new connections are still taken for OW_DRAIN_DELAY)."""
    runtime = request.app[RUNTIME]
    leaving = request.app[SOCKETS].leaving
    ready = runtime.initialized and not leaving
    state: dict[str, object] = {"ready": ready, "initialized": runtime.initialized, "draining": leaving}
    bus = runtime.hub.bus
    if bus is not None:
        # Said, not acted on: with Redis down this replica still serves its
        # own connections, and every replica would fail together (contract part D).
        state["redis"] = "up" if bus.up else "down"
    return json_response(protocol.dumps(state), 200 if ready else 503)


def demo_page(config: Config) -> bytes:
    page = resources.files("actionloop").joinpath("demo.html").read_text()
    return page.replace("__WS_PATH__", html.escape(config.websocket, quote=True)).encode()


def build_app(runtime: Runtime, sockets: Sockets) -> web.Application:
    config = runtime.config
    app = web.Application(client_max_size=config.max_body)
    app[RUNTIME] = runtime
    app[SOCKETS] = sockets
    app.router.add_post("/init", handle_init)
    app.router.add_post("/run", handle_run)
    app.router.add_get("/healthz", handle_live)
    app.router.add_get("/readyz", handle_ready)
    app.router.add_get("/metrics", handle_metrics)
    if config.websocket:
        app.router.add_get(config.websocket, handle_websocket)
    if config.demo and config.websocket and config.websocket != "/":
        page = demo_page(config)

        async def handle_demo(request: web.Request) -> web.Response:
            return web.Response(body=page, content_type="text/html", charset="utf-8")

        app.router.add_get("/", handle_demo)
    return app


async def make_runner(runtime: Runtime, sockets: Sockets) -> web.AppRunner:
    """The app, ready to take connections; no access log, as stdout/stderr are the action's."""
    runner = web.AppRunner(
        build_app(runtime, sockets),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=runtime.config.drain_timeout,
        # A header line may take the whole head (a browser's one Cookie line).
        max_line_size=HEAD_LIMIT,
        max_field_size=HEAD_LIMIT,
        # Idle between requests, and a later request's head, are bounded by
        # this: the time until its head is whole, from the reply before.
        keepalive_timeout=runtime.config.keepalive_timeout,
        lingering_time=LINGER,  # after an answer given before the body was read
        logger=LOGGER,
    )
    await runner.setup()
    return runner
