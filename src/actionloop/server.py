"""HTTP /init and /run, and the WebSocket endpoint: thin translation only.

Every decision lives in the runtime; this module turns requests into runtime
calls and runtime answers (or errors) into responses (SPEC.md parts A and B).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from . import payloads, protocol
from .config import Config
from .errors import ActionLoopError
from .runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)  # type: ignore[type-arg]
JSON = "application/json"


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
    if not origin_allowed(request.headers.get("Origin"), config.origins):
        return json_response(protocol.error("This origin may not open a WebSocket here."), 403)
    ws = web.WebSocketResponse(max_msg_size=config.max_message)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    await converse(request.app[RUNTIME], ws, f"ws-{next(_connection_ids)}")
    return ws


async def converse(runtime: Runtime, ws: web.WebSocketResponse, connection: str) -> None:
    """Continuous mode: each message invokes the action, the reply comes back."""
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            reply = await runtime.message(msg.data, connection)
            await ws.send_str(reply.decode())
        elif msg.type is WSMsgType.BINARY:
            await ws.send_str(protocol.error("Binary messages are not supported; send JSON text.").decode())


async def close_sockets(app: web.Application) -> None:
    """On shutdown, WebSocket clients hear 1001 (going away) (SPEC.md part C)."""
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def build_app(runtime: Runtime) -> web.Application:
    config = runtime.config
    app = web.Application(client_max_size=config.max_body)
    app[RUNTIME] = runtime
    app[SOCKETS] = weakref.WeakSet()
    app.router.add_post("/init", handle_init)
    app.router.add_post("/run", handle_run)
    if config.websocket:
        app.router.add_get(config.websocket, handle_websocket)
    app.on_shutdown.append(close_sockets)
    return app


async def start(app: web.Application, config: Config) -> web.AppRunner:
    """Listen; no banner and no access log, as stdout/stderr are the action's."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> Any:
    """The port actually bound (useful with port 0)."""
    for address in runner.addresses:
        return address[1]
    return None
