"""The management API (contract part D): push to connections, channels, broadcast.

It listens on its own port (OW_API_PORT), only when OW_API_TOKEN is set, and
answers only requests that bear that token: it is never served on the
public WebSocket port, so neither an Ingress nor a browser reaches it. JSON
in, JSON out; the operations themselves are the hub's (hub.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import protocol
from .config import Config
from .errors import ActionLoopError
from .hub import Hub

HUB = web.AppKey("hub", Hub)
GONE = protocol.error("The connection is gone (or never was).")
MAX_CHANNEL = 256
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware


def answer(body: dict[str, Any] | bytes, status: int = 200) -> web.Response:
    data = body if isinstance(body, bytes) else protocol.dumps(body)
    return web.Response(body=data, status=status, content_type="application/json")


def bearer(token: str) -> Middleware:
    """401 without `Authorization: Bearer`, 403 with a wrong token; 503 when a replica is out of reach."""
    wanted = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        if authorization[:7].lower() != "bearer ":
            headers = {"WWW-Authenticate": "Bearer"}
            return web.Response(
                body=protocol.error("Authorization: Bearer TOKEN is required."),
                status=401,
                content_type="application/json",
                headers=headers,
            )
        if not hmac.compare_digest(authorization[7:].strip().encode(), wanted):
            return answer(protocol.error("The token is not valid."), 403)
        try:
            return await handler(request)
        except ActionLoopError as exc:  # Unavailable (503), a refused request (400)
            return answer(protocol.error(exc.message), exc.status)
        except web.HTTPException as exc:  # 404, 405...: JSON too
            return answer(protocol.error(exc.reason), exc.status)

    return check


async def message(request: web.Request) -> bytes | web.Response:
    """The body as one compact JSON text, or a 400 saying why not."""
    try:
        return protocol.dumps(protocol.loads(await request.read()))
    except protocol.JSON_ERRORS as exc:
        return answer(protocol.error(f"The body is not valid JSON: {exc}"), 400)
    except web.HTTPRequestEntityTooLarge:
        return answer(protocol.error(f"The body is larger than {request.client_max_size} bytes."), 413)


async def to_connection(request: web.Request, operation: dict[str, Any], done: str) -> web.Response:
    operation["id"] = request.match_info["id"]
    found = await request.app[HUB].to_connection(operation)
    return answer({done: True}) if found else answer(GONE, 410)


async def send(request: web.Request) -> web.Response:
    data = await message(request)
    if isinstance(data, web.Response):
        return data
    return await to_connection(request, {"op": "send", "data": data}, "sent")


async def describe(request: web.Request) -> web.Response:
    found = await request.app[HUB].describe(request.match_info["id"])
    return answer(GONE, 410) if found is None else answer(found)


async def close(request: web.Request) -> web.Response:
    return await to_connection(request, {"op": "close"}, "closed")


def bad_channel(channel: str) -> web.Response | None:
    """A 400 for a channel name too long or with control characters."""
    if len(channel) > MAX_CHANNEL or not channel.isprintable():
        return answer(protocol.error(f"A channel name is 1 to {MAX_CHANNEL} printable characters."), 400)
    return None


async def subscribe(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    refused = bad_channel(channel)
    if refused is not None:
        return refused
    return await to_connection(request, {"op": "subscribe", "channel": channel}, "subscribed")


async def unsubscribe(request: web.Request) -> web.Response:
    operation = {"op": "unsubscribe", "channel": request.match_info["channel"]}
    return await to_connection(request, operation, "unsubscribed")


async def publish(request: web.Request) -> web.Response:
    refused = bad_channel(request.match_info["channel"])
    if refused is not None:
        return refused
    data = await message(request)
    if isinstance(data, web.Response):
        return data
    await request.app[HUB].to_everyone({"op": "publish", "channel": request.match_info["channel"], "data": data})
    return answer({"published": True})


async def broadcast(request: web.Request) -> web.Response:
    data = await message(request)
    if isinstance(data, web.Response):
        return data
    await request.app[HUB].to_everyone({"op": "broadcast", "data": data})
    return answer({"broadcast": True})


def build_app(hub: Hub, config: Config) -> web.Application:
    app = web.Application(middlewares=[bearer(config.api_token)], client_max_size=config.max_message)
    app[HUB] = hub
    app.router.add_post("/connections/{id}", send)
    app.router.add_get("/connections/{id}", describe)
    app.router.add_delete("/connections/{id}", close)
    app.router.add_put("/connections/{id}/channels/{channel}", subscribe)
    app.router.add_delete("/connections/{id}/channels/{channel}", unsubscribe)
    app.router.add_post("/channels/{channel}", publish)
    app.router.add_post("/broadcast", broadcast)
    return app


async def start(hub: Hub, config: Config) -> web.AppRunner:
    """Listen on OW_API_PORT (all interfaces: other pods reach it through its Service)."""
    runner = web.AppRunner(build_app(hub, config), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.api_port, reuse_address=True).start()
    return runner
