"""Shared server plumbing: app state, auth by app key, JSON helpers and Dify-shaped errors."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..config import AppConfig
from ..errors import ThreadlineError
from ..gateway import Gateway
from ..service import ConversationService
from .keys import KeyCache
from .signed_files import SECRET_NAME, FileSigner, new_secret


@dataclass
class ServerState:
    gateway: Gateway
    keys: KeyCache
    open_access: bool = False
    service: ConversationService = field(init=False)
    # Background responses (POST /v1/responses with background: true) running on after their answer.
    background: set[asyncio.Task[None]] = field(default_factory=set)
    _signer: FileSigner | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.service = ConversationService(self.gateway)

    async def file_signer(self) -> FileSigner:
        """The signer of file URLs: the configured secret, else the deployment's stored one."""
        if self._signer is None:
            server = self.gateway.settings.server
            secret = server.file_secret or await self.service.server_secret(SECRET_NAME, new_secret)
            self._signer = FileSigner(secret, server.file_url_ttl)
        return self._signer

    def public_origin(self, request: HTTPConnection) -> str:
        """Where the server is reached: [server] public_url, else the request's own base URL."""
        return self.gateway.settings.server.public_url or str(request.base_url).rstrip("/")


# Where authenticate() leaves the caller's app name in the ASGI scope, for the access log.
APP_SCOPE_KEY = "threadline.app"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the app their key selects, and that key (None in open mode without a key)."""

    app: AppConfig
    key_id: str | None = None


class HTTPError(Exception):
    """An error rendered in Dify's `{code, message, status}` shape (or OpenAI's on /chat/completions)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def dify_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"code": code, "message": message, "status": status}) + b"\n", status_code=status,
                    media_type="application/json", headers=headers)


def from_threadline(exc: ThreadlineError) -> HTTPError:
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after else None
    return HTTPError(exc.status, exc.code, exc.message, headers)


class EventStream:
    """A streamed response (server-sent events) that stops producing when the client goes away.

    uvicorn (ASGI 2.3) drops whatever an app sends after a disconnect without telling it, so a
    stream would go on pulling tokens from the engine for nobody; a watcher on `receive` cancels it,
    and closing the body closes the turn, which stores the partial answer as stopped. Starlette's
    StreamingResponse does the same with an anyio task group, two tasks and cancel scopes per
    response, which cost more than the rest of a short answer's stream."""

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        ended = gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not ended:  # uvicorn also answers "disconnect" once a response is complete
                gone = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the cancellation was ours: the client left, and that is a normal end
        finally:
            ended = True
            watcher.cancel()
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data) + b"\n", status_code=status, media_type="application/json")


_SPACED = json.JSONEncoder(ensure_ascii=False)  # built once: json.dumps builds one per call for these options


def spaced_json(data: Any) -> Response:
    """Dify's blocking chat body is `json.dumps` with spaces and no trailing newline."""
    return Response(_SPACED.encode(data), media_type="application/json; charset=utf-8")


def state(request: HTTPConnection) -> ServerState:
    tl: ServerState = request.app.state.tl
    return tl


_BEARER = {"WWW-Authenticate": 'Bearer realm="api"'}


async def authenticate(request: HTTPConnection) -> Caller:
    """A Bearer app key selects the app, exactly as a Dify app key does. Open mode lets a request
    without any key act as the default app; a key that is presented must be valid even then (a wrong
    or revoked key never falls back to the default app)."""
    st = state(request)
    header = request.headers.get("authorization")
    gw = st.gateway
    if header is None or not header.strip():
        if st.open_access:
            caller = Caller(gw.app_config(None))
            request.scope[APP_SCOPE_KEY] = caller.app.name
            return caller
        raise HTTPError(401, "unauthorized", "Authorization header must be provided and start with 'Bearer'", _BEARER)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPError(401, "unauthorized", "Authorization scheme must be 'Bearer'", _BEARER)
    record = await st.keys.lookup(token.strip())
    if record is None:
        raise HTTPError(401, "unauthorized", "Access token is invalid", _BEARER)
    try:
        caller = Caller(gw.app_config(None if record.app == "default" else record.app), record.id)
    except ThreadlineError:
        raise HTTPError(403, "forbidden", "The app no longer exists.") from None
    request.scope[APP_SCOPE_KEY] = caller.app.name  # for the access log (server/app.py): the name, never the key
    return caller


def check_user(request: Request, user: str) -> str:
    """A user id fits the store (at most [server] max_user_chars characters, no NUL): a longer one
    used to fail inside PostgreSQL as a 500, after part of the turn was written."""
    limit = state(request).gateway.settings.server.max_user_chars
    if len(user) > limit:
        raise HTTPError(400, "invalid_param", f"user is longer than the limit of {limit} characters")
    if "\x00" in user:
        raise HTTPError(400, "invalid_param", "user must not contain NUL characters")
    return user


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def read_json(request: Request) -> dict[str, Any]:
    """Parse a JSON body with Dify's answers for missing, empty and malformed bodies."""
    # A JSON content type is required (as Dify's Flask does): it is also what keeps a cross-site
    # form or `text/plain` fetch, which a browser sends without asking, from driving the server.
    if not is_json(request.headers.get("content-type", "")):
        raise HTTPError(415, "unsupported_media_type",
                        "Did not attempt to load JSON data because the request Content-Type was not 'application/json'.")
    body = await request.body()
    if not body:
        raise HTTPError(400, "bad_request", "The browser (or proxy) sent a request that this server could not understand.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HTTPError(400, "bad_request",
                        "The browser (or proxy) sent a request that this server could not understand.") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "invalid_param", "Invalid JSON payload received or JSON payload is empty.")
    return data


def dify_usage(usage: dict[str, Any] | None, price: dict[str, Any] | None, latency: float,
               ttft: float = 0.0) -> dict[str, Any]:
    u = usage or {}
    p = price or {}
    return {
        "prompt_tokens": int(u.get("prompt_tokens") or 0),
        "prompt_unit_price": str(p.get("prompt_unit_price", "0.0")),
        "prompt_price_unit": str(p.get("prompt_price_unit", "0.0")),
        "prompt_price": str(p.get("prompt_price", "0.0")),
        "completion_tokens": int(u.get("completion_tokens") or 0),
        "completion_unit_price": str(p.get("completion_unit_price", "0.0")),
        "completion_price_unit": str(p.get("completion_price_unit", "0.0")),
        "completion_price": str(p.get("completion_price", "0.0")),
        "total_tokens": int(u.get("total_tokens") or 0),
        "total_price": str(p.get("total_price", "0.0")),
        "currency": str(p.get("currency", "USD")),
        "latency": float(latency or 0.0),
        "time_to_first_token": round(float(ttft or 0.0), 3),
        "time_to_generate": round(max(0.0, float(latency or 0.0) - float(ttft or 0.0)), 3),
    }
