"""OpenAI-compatible chat completions over any engine or app.

OpenAI clients send the whole message list every time. Threadline maps it onto a stored
conversation (the longest stored prefix for this key and `user`), so the conversation continues on
any engine, including a stateful Dify app that only wants the newest query.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ..config import AppConfig
from ..errors import ThreadlineError
from ..messages import ImagePart, ReasoningDelta, TextDelta, TurnCompleted, TurnFailed, TurnStarted
from .common import Caller, EventStream, HTTPError, authenticate, is_json, state
from .models import ChatCompletion, ChatCompletionRequest, ModelList
from .spec import Operation


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def openai_error(exc: OpenAIError) -> Response:
    return Response(orjson.dumps({"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                                            "code": exc.code}}), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)


def error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
            415: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")


def _from_tl(exc: ThreadlineError) -> OpenAIError:
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after else {}
    return OpenAIError(exc.status, exc.message, error_type(exc.status), exc.code, headers=headers)


def _invalid(exc: ValidationError) -> OpenAIError:
    """OpenAI's own answer to a malformed body: the first problem, with its parameter path."""
    err = exc.errors(include_url=False)[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or None
    if err["type"] == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter")
    return OpenAIError(400, f"Invalid value for '{param}': {err['msg']}.", param=param, code="invalid_value")


def _text_and_images(content: str | list[dict[str, Any]] | None, where: str) -> tuple[str, list[ImagePart]]:
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    texts, images = [], []
    for i, p in enumerate(content):
        kind = p.get("type")
        if kind == "text":
            text = p.get("text")
            if not isinstance(text, str):
                raise OpenAIError(400, f"Invalid type for '{where}[{i}].text': expected a string.",
                                  param=f"{where}[{i}].text", code="invalid_type")
            texts.append(text)
        elif kind == "image_url":
            image_url = p.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:")):
                raise OpenAIError(400, f"Invalid value for '{where}[{i}].image_url': expected an object with a url "
                                       "(http(s) or data:).", param=f"{where}[{i}].image_url", code="invalid_value")
            images.append(ImagePart(url=url))
        else:
            raise OpenAIError(400, f"Invalid value for '{where}[{i}].type': {kind!r} is not a content part type "
                                   "Threadline forwards (text, image_url).", param=f"{where}[{i}].type",
                              code="invalid_value")
    return "\n".join(texts), images


async def _auth(request: Request) -> Caller:
    try:
        return await authenticate(request)
    except HTTPError as exc:
        raise OpenAIError(exc.status, exc.message, error_type(exc.status),
                          "invalid_api_key" if exc.status == 401 else exc.code) from None


def resolve_model(gw: Any, app: AppConfig, model: str) -> tuple[AppConfig, str | None]:
    """`model` names the caller's own app or an engine that app may use; nothing else exists for it
    (another app's name included), so the caller can neither act in nor learn about other apps."""
    if model == app.name:
        return app, None
    if model in gw.settings.engines and app.allows(model):
        return app, model
    raise OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                      code="model_not_found", param="model")


def visible_models(gw: Any, app: AppConfig) -> list[tuple[str, str]]:
    """(id, owned_by) of what `model` may name for this app: the app, then its usable engines."""
    out = [(app.name, "threadline-app")]
    out += [(name, f"threadline-engine:{e.kind}") for name, e in gw.settings.engines.items()
            if not e.missing and app.allows(name)]
    return out


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
    caller = await _auth(request)
    if not is_json(request.headers.get("content-type", "")):
        raise OpenAIError(415, "Content-Type must be application/json.", code="unsupported_media_type")
    try:
        body = ChatCompletionRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
        if exc.errors()[0]["type"] == "model_type":
            raise OpenAIError(400, "The request body must be a JSON object.") from None
        raise _invalid(exc) from None
    except HTTPError as exc:  # the body was larger than the server accepts
        raise OpenAIError(exc.status, exc.message, error_type(exc.status), exc.code) from None
    gw = state(request).gateway
    limits = gw.settings.server
    app_cfg, engine = resolve_model(gw, caller.app, body.model)
    if len(body.messages) > limits.max_messages:
        raise OpenAIError(400, f"'messages' has more than the limit of {limits.max_messages} items.", param="messages")
    user = body.user or "openai-user"
    if len(user) > limits.max_user_chars or "\x00" in user:
        raise OpenAIError(400, f"Invalid value for 'user': at most {limits.max_user_chars} characters, no NUL.",
                          param="user", code="invalid_value")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    images: list[ImagePart] = []
    for i, m in enumerate(body.messages):
        text, imgs = _text_and_images(m.content, f"messages[{i}].content")
        if len(text) > limits.max_text_chars:
            raise OpenAIError(400, f"'messages[{i}].content' is longer than the limit of {limits.max_text_chars} "
                                   "characters.", param=f"messages[{i}].content", code="string_above_max_length")
        if m.role in ("system", "developer"):
            system.append(text)
        elif m.role in ("user", "assistant"):
            turns.append((m.role, text))
            images = imgs
        else:
            raise OpenAIError(400, f"Unsupported role {m.role!r}", param=f"messages[{i}].role")
    if not turns or turns[-1][0] != "user":
        raise OpenAIError(400, "The last message must have role 'user'.", param="messages")
    query = turns[-1][1]
    if images:  # refused before the history is imported, not after
        try:
            gw.refuse_images(gw.engine(engine or app_cfg.engine))
        except ThreadlineError as exc:
            raise _from_tl(exc) from None
    history = turns[:-1]
    cid = await _match_conversation(request, app_cfg.name, user, history) if history else None
    stream = bool(body.stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # A history no stored conversation matches is stored by the turn, once its limits admit it.
    agen = gw.turn(query, user=user, app=app_cfg.name, conversation_id=cid, engine=engine, images=images,
                   stream=stream, extra_system=system, key_id=caller.key_id,
                   history=history if cid is None and history else None)
    try:
        first = await agen.__anext__()
    except ThreadlineError as exc:
        raise _from_tl(exc) from None
    if isinstance(first, TurnFailed):  # failed before the engine accepted: the real status, not a 200 stream
        await agen.aclose()
        raise _failure(first)
    assert isinstance(first, TurnStarted)
    completion_id = f"chatcmpl-{first.message_id}"
    created = int(first.created_at)
    headers = {"X-Threadline-Conversation-Id": first.conversation_id}
    if not stream:
        async with contextlib.aclosing(agen):  # closed here, not by a finalizer task later
            return await _blocking(agen, completion_id, created, body.model, headers)
    return EventStream(_sse(agen, completion_id, created, body.model, include_usage), headers)


def _failure(ev: TurnFailed) -> OpenAIError:
    err = _from_tl(ev.error) if isinstance(ev.error, ThreadlineError) else OpenAIError(
        500, "Internal error", "api_error", "internal_error")
    err.headers["X-Threadline-Conversation-Id"] = ev.reply.conversation_id
    return err


async def _blocking(agen: AsyncIterator[Any], completion_id: str, created: int, model: str,
                    headers: dict[str, str]) -> Response:
    async for ev in agen:
        if isinstance(ev, TurnFailed):
            raise _failure(ev)
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
        caller = await _auth(request)
    except OpenAIError as exc:
        return openai_error(exc)
    now = int(time.time())
    data = [{"id": mid, "object": "model", "created": now, "owned_by": owner}
            for mid, owner in visible_models(state(request).gateway, caller.app)]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


operations = [
    Operation("POST", "/v1/chat/completions", chat_completions, "Chat Completions (OpenAI-compatible)",
              surface="openai", body=ChatCompletionRequest, response=ChatCompletion, stream=True, tags=("OpenAI",)),
    Operation("GET", "/v1/models", models, "The models the key may name: its app and the app's engines",
              surface="openai", response=ModelList, tags=("OpenAI",)),
]
