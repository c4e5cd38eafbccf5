"""The FastAPI application: Dify-compatible and OpenAI-compatible routes over one gateway, the web
page at `/`, OpenAPI at `/docs`, structured access logs without secrets, and the gateway's own
overhead per request in `X-Threadline-Overhead-Ms`."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings
from ..errors import ThreadlineError
from ..gateway import Gateway, upstream_time
from . import dify_api, openai_api
from .common import HTTPError, ServerState, dify_error

access_log = logging.getLogger("threadline.access")
WEB = Path(__file__).parent / "web"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src * data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class OverheadMiddleware:
    """Adds X-Threadline-Overhead-Ms (time in Threadline, not waiting on the engine) and logs one
    structured line per request — method, path, status, ms; never headers or bodies."""

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
        finally:
            upstream_time.reset(token)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(orjson.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                                              "ms": round((time.perf_counter() - start) * 1000, 2)}).decode())


def settle_heap() -> None:
    """Move everything alive once the server has started (modules, the app, the migrated store) out
    of the garbage collector's sight. A full collection walks every tracked object; at startup that
    is a few hundred thousand of them, and they live as long as the process, so each full pass
    stalled every request in flight by tens of milliseconds for nothing. Only the server does this:
    it owns its process, a library user's program does not belong to us."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, *, open_access: bool = False, gateway: Gateway | None = None,
               own_process: bool = False) -> FastAPI:
    gw = gateway or Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        if own_process:
            settle_heap()
        yield
        await gw.close()

    app = FastAPI(title="Threadline", version=__version__, lifespan=lifespan,
                  description="Dify-compatible and OpenAI-compatible conversation API over any engine.")
    app.state.tl = ServerState(gateway=gw, open_access=open_access)
    app.state.key_cache = {}
    app.router.routes.extend(dify_api.routes)
    app.router.routes.extend(openai_api.routes)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> Response:
        if request.url.path in ("/v1/chat/completions", "/v1/models"):
            return openai_api.openai_error(openai_api.OpenAIError(exc.status, exc.message, code=exc.code))
        return dify_error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ThreadlineError)
    async def _tl_error(request: Request, exc: ThreadlineError) -> Response:
        return dify_error(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            return dify_error(405, "method_not_allowed", "The method is not allowed for the requested URL.")
        if exc.status_code == 404:
            return dify_error(404, "not_found", "The requested URL was not found on the server.")
        return dify_error(exc.status_code, "bad_request", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logging.getLogger("threadline.server").error("unhandled %s on %s", type(exc).__name__, request.url.path)
        return dify_error(500, "internal_server_error", "Internal Server Error, please contact support.")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        # The page runs no inline script, so a strict policy costs nothing and backs up DOMPurify.
        return FileResponse(WEB / "index.html", media_type="text/html", headers={"Content-Security-Policy": CSP})

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/healthz", include_in_schema=False)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "default_engine": settings.default_engine}

    app.add_middleware(OverheadMiddleware)
    return app
