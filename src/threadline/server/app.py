"""The FastAPI application: Dify-compatible and OpenAI-compatible routes over one gateway, the web
page at `/`, OpenAPI at `/docs`, structured access logs without secrets, and the gateway's own
overhead per request in `X-Threadline-Overhead-Ms`."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, Response
from starlette.routing import WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings
from ..errors import ThreadlineError
from ..gateway import Gateway, upstream_time
from . import conversations_api, dify_api, openai_api, responses_api, responses_ws
from .common import APP_SCOPE_KEY, EventStream, HTTPError, ServerState, dify_error
from .guard import RequestGuard
from .keys import KeyCache
from .spec import openapi, routes

access_log = logging.getLogger("threadline.access")
WEB = Path(__file__).parent / "web"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src * data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class OverheadMiddleware:
    """Adds X-Threadline-Overhead-Ms (time in Threadline, not waiting on the engine) and logs one
    structured line per request — method, path (no query), status, ms, app; never headers or bodies.
    Both lanes pass here (the fast lane has its own instance), so every request is logged.

    It is also the outermost catch: an exception no route handled is answered here in its surface's
    shape and logged by type only. Starlette's own outer layer would answer it too, but then re-raise
    it for the server to print the traceback, and a database error's traceback carries the SQL
    parameters: user text, ids, sometimes secrets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        token = upstream_time.set([0.0, 0.0])
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                acc = upstream_time.get()
                waiting = acc[0] + (time.perf_counter() - acc[1] if acc[1] else 0.0)
                overhead = (time.perf_counter() - start - waiting) * 1000
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-threadline-overhead-ms", f"{overhead:.2f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if status:  # the response had started: nothing more can be said to the client
                logging.getLogger("threadline.server").error("unhandled %s on %s after the response started",
                                                             type(exc).__name__, scope["path"])
            else:
                await error_response(Request(scope), exc)(scope, receive, send_wrapper)
        finally:
            upstream_time.reset(token)
            if access_log.isEnabledFor(logging.INFO):  # the path only: a query string can carry `user`
                access_log.info(orjson.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                                              "ms": round((time.perf_counter() - start) * 1000, 2),
                                              "app": scope.get(APP_SCOPE_KEY)}).decode())


def enable_access_log(stream: IO[str] | None = None) -> logging.Handler:
    """Turn the access log on (`threadline serve` does, unless --no-access-log or [server]
    access_log = false): one line per request on stderr, `<time> {"method", "path", "status", "ms",
    "app"}`. The path is without its query string; no header, key or body is ever in it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    return handler


OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


def is_openai_path(path: str, method: str = "GET") -> bool:
    """Whether errors on this route take OpenAI's shape. `/v1/conversations` is shared with Dify:
    its list and rename are Dify's, DELETE of a bare UUID too (see conversations_api)."""
    if path in OPENAI_PATHS or path.startswith(("/v1/models/", "/v1/responses")):
        return True
    if not path.startswith("/v1/conversations"):
        return False
    parts = path[len("/v1/conversations"):].strip("/").split("/")
    if parts == [""]:
        return method == "POST"
    if len(parts) > 1:
        return parts[1] == "items"
    return parts[0].startswith("conv_") or method != "DELETE"


def error_response(request: HTTPConnection, exc: Exception) -> Response:
    """Every error a route lets out, in its surface's shape: OpenAI's envelope on the OpenAI routes,
    Dify's `{code, message, status}` elsewhere. Unexpected ones are logged by type only (never a
    message that might carry a secret) and answered with a generic 500."""
    headers: dict[str, str] = {}
    if isinstance(exc, HTTPError):
        status, code, message, headers = exc.status, exc.code, exc.message, exc.headers
    elif isinstance(exc, ThreadlineError):
        status, code, message = exc.status, exc.code, exc.message
    elif isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
        status, code, message = 405, "method_not_allowed", "The method is not allowed for the requested URL."
    elif isinstance(exc, StarletteHTTPException) and exc.status_code == 404:
        status, code, message = 404, "not_found", "The requested URL was not found on the server."
    elif isinstance(exc, StarletteHTTPException):
        status, code, message = exc.status_code, "bad_request", str(exc.detail)
    else:
        logging.getLogger("threadline.server").error("unhandled %s on %s", type(exc).__name__, request.url.path)
        status, code, message = 500, "internal_server_error", "Internal Server Error, please contact support."
    if isinstance(exc, ThreadlineError) and exc.retry_after:
        headers = {**headers, "Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if is_openai_path(request.url.path, request.scope.get("method", "GET")):
        return openai_api.openai_error(openai_api.OpenAIError(status, message, openai_api.error_type(status), code,
                                                              headers=headers))
    return dify_error(status, code, message, headers)


Endpoint = Callable[[Request], Awaitable[Response | EventStream]]


class ThreadlineApp(FastAPI):
    """FastAPI, plus a fast lane for the routes that carry chat turns.

    A turn is the one request a gateway serves by the thousand, and FastAPI walks every request
    through its whole stack first: telemetry hooks, body-size limits, three exception layers, a
    search of the route table. The fast lane hands POSTs to the listed paths straight to their
    handler, inside the same overhead/access-log middleware and with the same error rendering as
    every other route; anything else (other methods, trailing slashes, docs) takes the full stack."""

    _fast_routes: dict[str, Endpoint]
    _fast: ASGIApp

    def fast_lane(self, routes: dict[str, Endpoint], guard: Callable[[ASGIApp], ASGIApp]) -> None:
        self._fast_routes = routes
        self._fast = OverheadMiddleware(guard(self._run_fast))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self._fast_routes:
            scope["app"] = self
            await self._fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _run_fast(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self._fast_routes[scope["path"]](request)
        except Exception as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)


YOUNG_GC_THRESHOLD = 10_000


def settle_heap() -> None:
    """Move everything alive once the server has started (modules, the app, the migrated store) out
    of the garbage collector's sight. A full collection walks every tracked object; at startup that
    is a few hundred thousand of them, and they live as long as the process, so each full pass
    stalled every request in flight by tens of milliseconds for nothing.

    Young collections also run less often: at the default threshold (700 allocations) one ran every
    couple of turns and walked the live objects of every turn in flight each time, promoting them to
    older generations to be walked again; at 10,000 the collector's share of a turn's CPU went from
    about 4% to under 1% (measured at concurrency 16), with each pause still under 2 ms.

    Only the server does this: it owns its process, a library user's program does not belong to us."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, 20, 20)


def create_app(settings: Settings, *, open_access: bool = False, gateway: Gateway | None = None,
               own_process: bool = False, listen_host: str | None = None) -> FastAPI:
    """The server. `listen_host` is the address it is bound to: open mode answers only requests
    addressed to it (or to a loopback name, or to [server] allowed_hosts)."""
    gw = gateway or Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        if own_process:
            settle_heap()
        yield
        await gw.close()

    app = ThreadlineApp(title="Threadline", version=__version__, lifespan=lifespan,
                        description="Dify-compatible and OpenAI-compatible conversation API over any engine.")
    app.state.tl = ServerState(gateway=gw, keys=KeyCache(gw.store, on_read=gw.limits.remember_key),
                               open_access=open_access)
    operations = [*dify_api.operations, *openai_api.operations, *responses_api.operations,
                  *conversations_api.operations]
    app.router.routes.extend(routes(operations))
    # The Responses API's WebSocket mode: GET /v1/responses upgraded (POST stays the HTTP route).
    app.router.routes.append(WebSocketRoute("/v1/responses", responses_ws.responses_socket))
    schema = openapi(operations, title=app.title, description=app.description)
    app.openapi = lambda: schema  # type: ignore[method-assign]

    def guard(inner: ASGIApp) -> ASGIApp:
        return RequestGuard(inner, server=settings.server, open_access=open_access, listen_host=listen_host,
                            render=error_response)

    app.fast_lane({"/v1/chat-messages": dify_api.chat_messages, "/v1/chat/completions": openai_api.chat_completions,
                   "/v1/responses": responses_api.create}, guard)

    async def _handler(request: Request, exc: Exception) -> Response:
        return error_response(request, exc)

    for kind in (HTTPError, ThreadlineError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _handler)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        # The page runs no inline script, so a strict policy costs nothing and backs up DOMPurify.
        return FileResponse(WEB / "index.html", media_type="text/html", headers={"Content-Security-Policy": CSP})

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/healthz", include_in_schema=False)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "default_engine": settings.default_engine}

    app.add_middleware(RequestGuard, server=settings.server, open_access=open_access, listen_host=listen_host,
                       render=error_response)
    app.add_middleware(OverheadMiddleware)  # added last: the outermost
    return app
