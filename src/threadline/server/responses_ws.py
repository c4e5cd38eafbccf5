"""WebSocket mode of the Responses API: `GET /v1/responses` upgraded, one socket for a whole agent
loop (Open Responses 2026-04-24, as OpenAI serves it; `client.responses.connect()` in openai-python).

Why a socket at all: a tool-heavy agent sends dozens of responses in a row, each continuing the one
before. Over HTTP every one is a request of its own; here the client sends `response.create`
messages (the create body, without the HTTP-only `stream`, `stream_options` and `background`) and
reads back the very events the SSE stream carries, as JSON text frames. Each response runs through
the same `plan_turn` and the same renderer (`responses_api._stream`) as the HTTP route, so ids,
sequence numbers and stored state are the same whichever way a client came.

What the transport adds, by the spec:
- One response at a time per connection: later `response.create` messages wait their turn, in order.
- A connection-local cache of the most recent response, which is what lets `store: false` chain:
  its scratch conversation stays alive while it is the cached one (nobody else can reach it: not
  retrieve, not another socket, not HTTP) and is purged when a newer response replaces it, when a
  continuation of it fails (the id is evicted), or when the connection closes. Continuing anything
  else unstored is `previous_response_not_found`, as OpenAI answers.
- At most 60 minutes per connection: a message after that is answered with
  `websocket_connection_limit_reached` and the socket is closed (1001, going away); a response that
  is running at the deadline finishes first.
- Authentication is the upgrade's own `Authorization` header, with the HTTP routes' key rules; a
  refused upgrade is an HTTP 401 with OpenAI's error body, before any socket exists. (Browsers
  cannot set that header, so in key mode no web page can drive this; open mode's Host and Origin
  checks run on the upgrade in `guard.RequestGuard`.)
- A client that goes away mid-response stops the turn, which keeps its partial answer as stopped
  (as the SSE route does).

Errors are `{type: "error", status, error: {type, code, message, param}}` frames; the connection
stays open after one (except at the age limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..errors import ThreadlineError
from ..messages import TurnFailed, TurnStarted
from ..service import Scope
from .common import APP_SCOPE_KEY, Caller, state
from .guard import deny_upgrade
from .openai_api import OpenAIError, _auth, _invalid, openai_error
from .responses_api import _Events, _failure, _failure_of, _stream, plan_turn, response_id
from .responses_models import ResponseCreateRequest

log = logging.getLogger("threadline.server")
access_log = logging.getLogger("threadline.access")

CONNECTION_LIMIT_S = 60 * 60  # read when a connection opens (tests shorten it)
MAX_PENDING = 16  # response.create messages waiting behind the running one
HTTP_ONLY = ("stream", "stream_options", "background")
NOT_HERE = {"stream_id": "lanes (stream_id) are not supported: this connection runs one response at a time, in order",
            "generate": "warm-up requests (generate) are not supported: send the response.create that answers"}


@dataclass(frozen=True, slots=True)
class _Made:
    """A response this connection made: where it lives, and whether that place is a scratch
    conversation (store: false) the connection must purge."""

    rid: str
    scope: Scope
    conversation_id: str
    scratch: bool


class _Connection:
    def __init__(self, ws: WebSocket, caller: Caller) -> None:
        st = state(ws)
        self.ws = ws
        self.caller = caller
        self.svc = st.service
        self.max_bytes = st.gateway.settings.server.max_body_bytes
        self.deadline = time.monotonic() + CONNECTION_LIMIT_S
        self.pending: asyncio.Queue[str] = asyncio.Queue()
        self.cache: _Made | None = None  # the most recent response
        self.running: _Made | None = None  # the response being streamed now
        self.lock = asyncio.Lock()  # one frame at a time: the reader may answer while a response streams
        self.responses = 0

    # ---- frames ----------------------------------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        async with self.lock:
            await self.ws.send({"type": "websocket.send", "text": frame.decode()})

    async def send_error(self, exc: OpenAIError) -> None:
        err: dict[str, Any] = {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param}
        if exc.headers:
            err["headers"] = exc.headers
        await self.send(orjson.dumps({"type": "error", "status": exc.status, "error": err}))

    # ---- the two tasks -----------------------------------------------------------------------------

    async def read(self) -> None:
        """Queue every message as it comes, so a disconnect is seen while a response runs."""
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                text = (msg.get("bytes") or b"").decode("utf-8", "replace")
            if len(text) > self.max_bytes:  # refused before it waits in the queue
                await self.send_error(OpenAIError(413, f"The message is larger than the limit of {self.max_bytes} "
                                                       "bytes.", code="request_too_large"))
                continue
            if self.pending.qsize() >= MAX_PENDING:
                await self.send_error(OpenAIError(
                    429, f"More than {MAX_PENDING} response.create messages are waiting on this connection: wait "
                         "for a response to end before sending more.", "rate_limit_error", "too_many_pending_requests"))
                continue
            self.pending.put_nowait(text)

    async def run(self) -> None:
        """Answer the queued messages one at a time, in order, until the connection's age limit."""
        while True:
            try:
                text = await asyncio.wait_for(self.pending.get(), max(0.0, self.deadline - time.monotonic()))
            except TimeoutError:
                await self.send_error(OpenAIError(
                    400, f"This WebSocket has reached its limit of {CONNECTION_LIMIT_S // 60} minutes: open a new "
                         "connection to continue (a store: false chain starts again from its full input).",
                    code="websocket_connection_limit_reached"))
                await self.ws.close(1001, "websocket_connection_limit_reached")
                return
            try:
                await self.respond(text)
            except OpenAIError as exc:
                await self.send_error(exc)

    # ---- one response ------------------------------------------------------------------------------

    def read_body(self, text: str) -> ResponseCreateRequest:
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise OpenAIError(400, "We could not parse the JSON of your message.") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "A message must be a JSON object.")
        kind = data.pop("type", None)
        if kind != "response.create":
            raise OpenAIError(400, f"Invalid value for 'type': {kind!r}. This WebSocket takes response.create "
                                   "messages.", param="type", code="invalid_value")
        for name in HTTP_ONLY:
            if name in data:
                raise OpenAIError(400, f"'{name}' is not used over a WebSocket: every response streams its events "
                                       "on the connection. Leave it out.", param=name, code="unsupported_parameter")
        for name, why in NOT_HERE.items():
            if name in data:
                raise OpenAIError(400, f"'{name}': {why}.", param=name, code="unsupported_parameter")
        try:
            return ResponseCreateRequest.model_validate(data)
        except ValidationError as exc:
            raise _invalid(exc) from None

    async def respond(self, text: str) -> None:
        body = self.read_body(text)
        cached = self.cache
        continuing = cached is not None and body.previous_response_id == cached.rid
        try:
            ok = await self.stream(body, cached.rid if cached is not None and cached.scratch else None)
        except OpenAIError:
            if continuing:
                await self.evict()
            raise
        if not ok and continuing:
            await self.evict()

    async def stream(self, body: ResponseCreateRequest, local: str | None) -> bool:
        """Run one response, its events sent as they come; True when it completed (or ended
        incomplete), and it is then the connection's cached response."""
        plan = await plan_turn(self.ws, self.caller, body, local, streamed=True)
        agen = self.svc.turn(plan.scope, plan.request)
        try:
            first = await agen.__anext__()
        except ThreadlineError as exc:
            raise _failure_of(exc) from None
        if isinstance(first, TurnFailed):  # refused before the engine answered: an error frame, no events
            await agen.aclose()
            await self.discard(_Made("", plan.scope, first.reply.conversation_id, plan.scratch))
            raise _failure(first)
        assert isinstance(first, TurnStarted)
        made = _Made(response_id(first.message_id), plan.scope, first.conversation_id, plan.scratch)
        self.running = made
        self.responses += 1
        events = _Events(first.message_id, plan.echo, first.created_at, ws=True)
        async with contextlib.aclosing(_stream(agen, plan, first, events, self.svc, scrap=False)) as frames:
            async for frame in frames:
                await self.send(frame)
        self.running = None
        if events.final is not None and events.final["status"] in ("completed", "incomplete"):
            old, self.cache = self.cache, made
            if old is not None and old.conversation_id != made.conversation_id:
                await self.discard(old, cached=False)
            return True
        await self.discard(made)
        return False

    # ---- scratch conversations -----------------------------------------------------------------------

    async def discard(self, made: _Made, *, cached: bool = True) -> None:
        """Purge a scratch conversation unless it is still the cached response's (`cached`)."""
        if not made.scratch:
            return
        if cached and self.cache is not None and self.cache.conversation_id == made.conversation_id:
            return
        with contextlib.suppress(ThreadlineError):
            await asyncio.shield(self.svc.purge(made.scope, made.conversation_id))

    async def evict(self) -> None:
        old, self.cache = self.cache, None
        if old is not None:
            await self.discard(old, cached=False)

    async def close(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            await self.discard(running)
        await self.evict()


async def responses_socket(ws: WebSocket) -> None:
    try:
        caller = await _auth(ws)
    except OpenAIError as exc:
        await deny(ws, openai_error(exc))
        return
    start = time.perf_counter()
    await ws.accept()
    conn = _Connection(ws, caller)
    reader = asyncio.create_task(conn.read())
    runner = asyncio.create_task(conn.run())
    try:
        await asyncio.wait((reader, runner), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # The client left (the running turn is cancelled: its partial answer is kept as stopped),
        # or the runner ended (age limit, or a failure).
        for task in (runner, reader):
            task.cancel()
        outcomes = await asyncio.gather(runner, reader, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, Exception) and not _gone(o)]
        await conn.close()
        for err in failed:  # by type only: a message may carry user text or a secret
            log.error("unhandled %s on the /v1/responses WebSocket", type(err).__name__)
        if failed:
            with contextlib.suppress(Exception):
                await ws.close(1011)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(orjson.dumps({"method": "WEBSOCKET", "path": ws.url.path, "status": 101,
                                          "responses": conn.responses, "app": ws.scope.get(APP_SCOPE_KEY),
                                          "ms": round((time.perf_counter() - start) * 1000, 2)}).decode())


def _gone(exc: BaseException) -> bool:
    """The client went away while a frame was being sent: a normal end of a connection."""
    return isinstance(exc, WebSocketDisconnect | OSError)


async def deny(ws: WebSocket, response: Response) -> None:
    await deny_upgrade(ws.scope, ws.receive, ws.send, response)
