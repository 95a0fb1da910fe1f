"""HTTP /init and /run, and the WebSocket endpoint: thin translation only.

Every decision lives in the runtime; this module turns requests into runtime
calls and runtime answers (or errors) into responses (SPEC.md parts A and B).
"""

from __future__ import annotations

import asyncio
import html
import itertools
from importlib import resources
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from . import payloads, protocol
from .config import Config
from .errors import ActionLoopError
from .runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
JSON = "application/json"


class Sockets:
    """The open WebSockets, and which are mid-message (for a graceful drain)."""

    def __init__(self) -> None:
        self.open: set[web.WebSocketResponse] = set()
        self.busy: set[web.WebSocketResponse] = set()
        self.draining = False


SOCKETS = web.AppKey("sockets", Sockets)


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


def error_response(exc: ActionLoopError) -> web.Response:
    return json_response(protocol.error(exc.message), exc.status)


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ActionLoopError(f"The request body is larger than {request.client_max_size} bytes.", 413) from exc


async def handle_init(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        runtime.check_can_init()
        await runtime.init(payloads.parse_init(await read_body(request)))
    except ActionLoopError as exc:
        return error_response(exc)
    return json_response(protocol.OK)


async def handle_run(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        body = payloads.parse_run(await read_body(request))
        return json_response(await runtime.run(body))
    except ActionLoopError as exc:
        return error_response(exc)


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


_connection_ids = itertools.count(1)


async def handle_websocket(request: web.Request) -> web.StreamResponse:
    config: Config = request.app[RUNTIME].config
    sockets = request.app[SOCKETS]
    if not origin_allowed(request.headers.get("Origin"), config.origins):
        return json_response(protocol.error("This origin may not open a WebSocket here."), 403)
    if sockets.draining:
        return json_response(protocol.error("The server is shutting down."), 503)
    ws = web.WebSocketResponse(max_msg_size=config.max_message, heartbeat=config.ping_interval or None)
    await ws.prepare(request)
    sockets.open.add(ws)
    try:
        await converse(request.app[RUNTIME], ws, sockets, f"ws-{next(_connection_ids)}")
    finally:
        sockets.open.discard(ws)
    return ws


async def converse(runtime: Runtime, ws: web.WebSocketResponse, sockets: Sockets, connection: str) -> None:
    """Continuous mode: each message invokes the action, the reply comes back."""
    async for msg in ws:
        sockets.busy.add(ws)
        try:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str((await runtime.message(msg.data, connection)).decode())
            elif msg.type is WSMsgType.BINARY:
                # A binary frame of UTF-8 JSON is served alike, answered in kind.
                await ws.send_bytes(await runtime.message(msg.data, connection))
            else:  # ERROR: e.g. an oversized message, already closed with 1009
                break
        except ConnectionResetError:
            break  # the client vanished before its reply; nobody else is affected
        finally:
            sockets.busy.discard(ws)
        if sockets.draining:
            # The in-flight reply is out; now say goodbye (SPEC.md part C).
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


async def close_sockets(app: web.Application) -> None:
    """On shutdown, idle WebSockets hear 1001 (going away) now; busy ones after their reply."""
    sockets = app[SOCKETS]
    sockets.draining = True
    idle = sockets.open - sockets.busy
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down") for ws in idle))


async def handle_live(request: web.Request) -> web.Response:
    """Liveness: the server answers and its action can run (or be restarted)."""
    runtime = request.app[RUNTIME]
    live = runtime.live
    state = {"live": live, "initialized": runtime.initialized}
    return json_response(protocol.dumps(state), 200 if live else 503)


async def handle_ready(request: web.Request) -> web.Response:
    """Readiness: an action is initialised and the server is not draining."""
    runtime = request.app[RUNTIME]
    ready = runtime.initialized and not request.app[SOCKETS].draining
    state = {"ready": ready, "initialized": runtime.initialized, "draining": request.app[SOCKETS].draining}
    return json_response(protocol.dumps(state), 200 if ready else 503)


def demo_page(config: Config) -> bytes:
    page = resources.files("actionloop").joinpath("demo.html").read_text()
    return page.replace("__WS_PATH__", html.escape(config.websocket, quote=True)).encode()


def build_app(runtime: Runtime) -> web.Application:
    config = runtime.config
    app = web.Application(client_max_size=config.max_body)
    app[RUNTIME] = runtime
    app[SOCKETS] = Sockets()
    app.router.add_post("/init", handle_init)
    app.router.add_post("/run", handle_run)
    app.router.add_get("/healthz", handle_live)
    app.router.add_get("/readyz", handle_ready)
    if config.websocket:
        app.router.add_get(config.websocket, handle_websocket)
    if config.demo and config.websocket and config.websocket != "/":
        page = demo_page(config)
        app.router.add_get("/", lambda _: web.Response(body=page, content_type="text/html", charset="utf-8"))
    app.on_shutdown.append(close_sockets)
    return app


async def start(app: web.Application, config: Config) -> web.AppRunner:
    """Listen; no banner and no access log, as stdout/stderr are the action's."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=config.drain_timeout)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> Any:
    """The port actually bound (useful with port 0)."""
    for address in runner.addresses:
        return address[1]
    return None
