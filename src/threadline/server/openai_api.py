"""OpenAI-compatible chat completions over any engine or app.

OpenAI clients send the whole message list every time. Threadline maps it onto a stored
conversation (the longest stored prefix for this key and `user`), so the conversation continues on
any engine, including a stateful Dify app that only wants the newest query.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..config import AppConfig
from ..errors import ThreadlineError
from ..messages import ImagePart, ReasoningDelta, TextDelta, TurnCompleted, TurnFailed, TurnStarted
from .common import EventStream, HTTPError, authenticate, state


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def openai_error(exc: OpenAIError) -> Response:
    return Response(orjson.dumps({"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                                            "code": exc.code}}), status_code=exc.status, media_type="application/json")


def error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            409: "conflict_error", 429: "rate_limit_error"}.get(status, "api_error")


def _from_tl(exc: ThreadlineError) -> OpenAIError:
    return OpenAIError(exc.status, exc.message, error_type(exc.status), exc.code)


def _text_and_images(content: Any) -> tuple[str, list[ImagePart]]:
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise OpenAIError(400, "Invalid type for 'messages[].content'", code="invalid_type", param="messages")
    texts, images = [], []
    for p in content:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "text":
            texts.append(str(p.get("text", "")))
        elif p.get("type") == "image_url":
            url = (p.get("image_url") or {}).get("url")
            if url:
                images.append(ImagePart(url=url))
    return "\n".join(texts), images


async def _auth(request: Request) -> AppConfig:
    try:
        return await authenticate(request)
    except HTTPError as exc:
        raise OpenAIError(exc.status, exc.message, "authentication_error", "invalid_api_key") from None


async def _match_conversation(request: Request, app: str, user: str, history: list[tuple[str, str]]) -> str | None:
    """The stored conversation whose messages equal the client's history (newest conversations first)."""
    store = state(request).gateway.store
    convs, _ = await store.list_conversations(app=app, user=user, limit=50)
    for c in convs:
        if c["last_seq"] != len(history):
            continue
        rows, _ = await store.list_messages(c["id"], limit=len(history) + 1)
        stored = [(r["role"], (r["content"] or "").strip()) for r in rows]
        if stored == [(r, t.strip()) for r, t in history]:
            return c["id"]
    return None


async def chat_completions(request: Request) -> Response | EventStream:
    try:
        return await _chat_completions(request)
    except OpenAIError as exc:
        return openai_error(exc)


async def _chat_completions(request: Request) -> Response | EventStream:
    key_app = await _auth(request)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    gw = state(request).gateway
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "you must provide a model parameter", param="model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise OpenAIError(400, "'messages' must be a non-empty array", param="messages")
    settings = gw.settings
    app_cfg, engine = key_app, None
    if model in settings.apps:
        app_cfg = settings.apps[model]
    elif model in settings.engines:
        engine = model
    elif model not in (key_app.name, "default"):
        raise OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                          code="model_not_found")
    user = str(body.get("user") or "openai-user")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for m in msgs:
        if not isinstance(m, dict):
            raise OpenAIError(400, "Invalid message", param="messages")
        role = m.get("role")
        text, _imgs = _text_and_images(m.get("content"))
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise OpenAIError(400, f"Unsupported role {role!r}", param="messages")
    if not turns or turns[-1][0] != "user":
        raise OpenAIError(400, "The last message must have role 'user'.", param="messages")
    query, images = _text_and_images(msgs[-1].get("content"))
    if images:  # refused before the history is imported, not after
        try:
            gw.refuse_images(gw.engine(engine or app_cfg.engine))
        except ThreadlineError as exc:
            raise _from_tl(exc) from None
    history = turns[:-1]
    cid = await _match_conversation(request, app_cfg.name, user, history) if history else None
    if cid is None and history:
        cid = await gw.import_history(app=app_cfg.name, user=user, engine=engine or app_cfg.engine, turns=history)
    stream = bool(body.get("stream"))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    agen = gw.turn(query, user=user, app=app_cfg.name, conversation_id=cid, engine=engine, images=images,
                   stream=stream, extra_system=system)
    try:
        first = await agen.__anext__()
    except ThreadlineError as exc:
        raise _from_tl(exc) from None
    assert isinstance(first, TurnStarted)
    completion_id = f"chatcmpl-{first.message_id}"
    created = int(first.created_at)
    headers = {"X-Threadline-Conversation-Id": first.conversation_id}
    if not stream:
        async with contextlib.aclosing(agen):  # closed here, not by a finalizer task later
            return await _blocking(agen, completion_id, created, model, headers)
    return EventStream(_sse(agen, completion_id, created, model, include_usage), headers)


async def _blocking(agen: AsyncIterator[Any], completion_id: str, created: int, model: str,
                    headers: dict[str, str]) -> Response:
    async for ev in agen:
        if isinstance(ev, TurnFailed):
            if isinstance(ev.error, ThreadlineError):
                raise _from_tl(ev.error)
            raise OpenAIError(500, "Internal error", "api_error")
        if isinstance(ev, TurnCompleted):
            r = ev.reply
            message: dict[str, Any] = {"role": "assistant", "content": r.answer, "refusal": None}
            if r.reasoning:
                message["reasoning_content"] = r.reasoning
            return Response(orjson.dumps({
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": "stop" if r.status == "completed" else "length"}],
                "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                          "total_tokens": r.usage.total_tokens,
                          "completion_tokens_details": {"reasoning_tokens": r.usage.reasoning_tokens}},
            }), media_type="application/json", headers=headers)
    raise OpenAIError(500, "Internal error", "api_error")


async def _sse(agen: AsyncIterator[Any], cid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                         "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                                      "finish_reason": finish}]}) + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for ev in agen:
            if isinstance(ev, TextDelta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, ReasoningDelta):
                yield chunk({"reasoning_content": ev.text})
            elif isinstance(ev, TurnCompleted):
                r = ev.reply
                yield chunk({}, "stop" if r.status == "completed" else "length")
                if include_usage:
                    yield b"data: " + orjson.dumps({
                        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": {"prompt_tokens": r.usage.prompt_tokens,
                                                 "completion_tokens": r.usage.completion_tokens,
                                                 "total_tokens": r.usage.total_tokens}}) + b"\n\n"
            elif isinstance(ev, TurnFailed):
                e = ev.error
                yield b"data: " + orjson.dumps({"error": {
                    "message": getattr(e, "message", "Internal error"), "type": "api_error",
                    "param": None, "code": getattr(e, "code", "internal_error")}}) + b"\n\n"
    finally:
        await agen.aclose()
    yield b"data: [DONE]\n\n"


async def models(request: Request) -> Response:
    try:
        await _auth(request)
    except OpenAIError as exc:
        return openai_error(exc)
    s = state(request).gateway.settings
    now = int(time.time())
    data = [{"id": name, "object": "model", "created": now, "owned_by": "threadline-app"} for name in s.apps]
    data += [{"id": name, "object": "model", "created": now, "owned_by": f"threadline-engine:{e.kind}"}
             for name, e in s.engines.items() if not e.missing]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
