"""OpenAI-compatible chat completions over any engine or app.

OpenAI clients send the whole message list every time. Threadline maps it onto a stored
conversation (the longest stored prefix for this key and `user`), so the conversation continues on
any engine, including a stateful Dify app that only wants the newest query.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from ..config import AppConfig
from ..errors import ThreadlineError
from ..messages import (
    FunctionCall,
    FunctionResult,
    GenerationParams,
    ImagePart,
    Item,
    ReasoningDelta,
    ResponseFormat,
    TextDelta,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    Usage,
)
from ..service import Scope
from ..turns import PastMessage, TurnRequest
from .common import Caller, EventStream, HTTPError, authenticate, is_json, state
from .models import ChatCompletion, ChatCompletionRequest, Model, ModelList
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
    return OpenAIError(exc.status, exc.message, error_type(exc.status), exc.code, param=getattr(exc, "param", None),
                       headers=headers)


def _invalid(exc: ValidationError) -> OpenAIError:
    """OpenAI's own answer to a malformed body: the first problem, with its parameter path."""
    err = exc.errors(include_url=False)[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or None
    if err["type"] == "extra_forbidden":
        if param in KNOWN_UNSUPPORTED:
            return OpenAIError(400, f"'{param}' is not supported by Threadline: leave it out.", param=param,
                               code="unsupported_parameter")
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unrecognized_argument")
    if err["type"] == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter")
    return OpenAIError(400, f"Invalid value for '{param}': {err['msg']}.", param=param, code="invalid_value")


# OpenAI request fields Threadline knows and cannot honour: refused by name, not as unrecognized.
KNOWN_UNSUPPORTED = frozenset({"logit_bias", "top_logprobs", "service_tier", "prompt_cache_key",
                               "prompt_cache_retention", "verbosity", "modalities", "audio", "prediction",
                               "web_search_options", "functions", "function_call", "prompt", "context_management",
                               "prompt_cache_options", "moderation"})
CONVERSATION_HEADER = "x-threadline-conversation-id"
CONVERSATION_METADATA = "threadline_conversation_id"


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
            detail = image_url.get("detail") if isinstance(image_url, dict) else None
            if detail not in (None, "auto", "low", "high"):
                raise OpenAIError(400, f"Invalid value for '{where}[{i}].image_url.detail': {detail!r} (auto, low or "
                                       "high).", param=f"{where}[{i}].image_url.detail", code="invalid_value")
            if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:")):
                raise OpenAIError(400, f"Invalid value for '{where}[{i}].image_url': expected an object with a url "
                                       "(http(s) or data:).", param=f"{where}[{i}].image_url", code="invalid_value")
            images.append(ImagePart(url=url, detail=None if detail == "auto" else detail))
        else:
            raise OpenAIError(400, f"Invalid value for '{where}[{i}].type': {kind!r} is not a content part type "
                                   "Threadline forwards (text, image_url).", param=f"{where}[{i}].type",
                              code="invalid_value")
    return "\n".join(texts), images


async def _auth(request: HTTPConnection) -> Caller:
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


def _generation(body: ChatCompletionRequest) -> GenerationParams:
    """The request's sampling and output parameters; what no engine can honour is refused here."""
    if body.n is not None and body.n != 1:
        raise OpenAIError(400, "'n' greater than 1 is not supported: a conversation keeps one answer per turn.",
                          param="n", code="unsupported_parameter")
    if body.logprobs:
        raise OpenAIError(400, "'logprobs' is not supported by Threadline: leave it out.", param="logprobs",
                          code="unsupported_parameter")
    if body.store is False:
        raise OpenAIError(400, "'store': false is not supported: Threadline keeps every conversation.",
                          param="store", code="unsupported_parameter")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise OpenAIError(400, "Give 'max_tokens' or 'max_completion_tokens', not both.",
                          param="max_completion_tokens", code="invalid_value")
    rf = None
    if body.response_format is not None and body.response_format.type != "text":
        js = body.response_format.json_schema
        rf = ResponseFormat(body.response_format.type, js.schema_ if js else None, js.name if js else None,
                            js.strict if js else None, js.description if js else None)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop) if body.stop else None
    return GenerationParams(
        temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=stop, seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        response_format=rf, parallel_tool_calls=body.parallel_tool_calls, reasoning_effort=body.reasoning_effort)


class _Split:
    """A client's message list, read: system text, history, and the new input (the trailing user
    text and images, or the results of the last answer's function calls)."""

    def __init__(self, body: ChatCompletionRequest, max_chars: int) -> None:
        self.system: list[str] = []
        self.history: list[PastMessage] = []
        self.text = ""
        self.images: list[ImagePart] = []
        self.results: list[FunctionResult] = []
        pending_calls: dict[str, str] = {}  # call id -> name, of the last assistant message
        group: tuple[list[str], list[Item]] | None = None  # the user side being read: texts, items
        msgs = body.messages
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if m.name is not None and m.role != "tool":
                raise OpenAIError(400, f"'{where}.name' is not supported: Threadline does not keep participant names; "
                                       "leave it out.", param=f"{where}.name", code="unsupported_parameter")
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise OpenAIError(400, f"Missing required parameter: '{where}.tool_call_id'.",
                                      param=f"{where}.tool_call_id", code="missing_required_parameter")
                if m.tool_call_id not in pending_calls:
                    raise OpenAIError(400, "Invalid parameter: messages with role 'tool' must be a response to a "
                                           "preceeding message with 'tool_calls'.", param=f"{where}.role",
                                      code="invalid_tool_result")
                text, imgs = _text_and_images(m.content, f"{where}.content")
                if imgs:  # a function result is text: an image in it would be lost on the way
                    raise OpenAIError(400, f"Invalid value for '{where}.content': a tool message carries text "
                                           "parts only; send images in a user message.", param=f"{where}.content",
                                      code="invalid_value")
                self._check_len(text, where, max_chars)
                group = group or ([], [])
                group[1].append(FunctionResult(m.tool_call_id, text, pending_calls.pop(m.tool_call_id)))
                continue
            if pending_calls:
                raise OpenAIError(400, "An assistant message with 'tool_calls' must be followed by tool messages "
                                       "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                                       f"response messages: {', '.join(pending_calls)}", param=f"{where}.role",
                                  code="invalid_tool_result")
            text, imgs = _text_and_images(m.content, f"{where}.content")
            self._check_len(text, where, max_chars)
            if m.role in ("system", "developer"):
                self.system.append(text)
            elif m.role == "user":
                group = group or ([], [])
                group[0].append(text)
                group[1].extend(imgs)
            else:  # assistant
                if group is not None:
                    self.history.append(PastMessage("user", "\n".join(group[0]), tuple(group[1])))
                    group = None
                calls = [FunctionCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()]
                pending_calls = {c.call_id: c.name for c in calls}
                self.history.append(PastMessage("assistant", text, tuple(calls)))
        if pending_calls or group is None:
            raise OpenAIError(400, "The last message must have role 'user' or 'tool'.", param="messages")
        self.text = "\n".join(group[0])
        self.images = [i for i in group[1] if isinstance(i, ImagePart)]
        self.results = [i for i in group[1] if isinstance(i, FunctionResult)]

    @staticmethod
    def _check_len(text: str, where: str, max_chars: int) -> None:
        if len(text) > max_chars:
            raise OpenAIError(400, f"'{where}.content' is longer than the limit of {max_chars} characters.",
                              param=f"{where}.content", code="string_above_max_length")


def _tools(body: ChatCompletionRequest) -> tuple[tuple[ToolSpec, ...], ToolChoice | None]:
    tools = tuple(ToolSpec(t.function.name, t.function.description, t.function.parameters, t.function.strict)
                  for t in body.tools or ())
    choice: ToolChoice | None = None
    if isinstance(body.tool_choice, str):
        choice = ToolChoice(body.tool_choice)
    elif body.tool_choice is not None:
        name = body.tool_choice.function.name
        if name not in {t.name for t in tools}:
            raise OpenAIError(400, f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.",
                              param="tool_choice", code="invalid_value")
        choice = ToolChoice("function", name)
    if choice is not None and choice.mode != "none" and not tools:
        raise OpenAIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                               "specified.", param="tool_choice", code="invalid_value")
    return tools, choice


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
    user = body.user or body.safety_identifier or "openai-user"
    if len(user) > limits.max_user_chars or "\x00" in user:
        raise OpenAIError(400, f"Invalid value for 'user': at most {limits.max_user_chars} characters, no NUL.",
                          param="user", code="invalid_value")
    svc = state(request).service
    scope = Scope(app_cfg.name, user)
    named = request.headers.get(CONVERSATION_HEADER)
    meta = dict(body.metadata or {})
    named = meta.pop(CONVERSATION_METADATA, None) or named
    if meta:
        raise OpenAIError(400, f"metadata key {sorted(meta)[0]!r} is not supported: Threadline reads only "
                               f"'{CONVERSATION_METADATA}'.", param="metadata", code="unsupported_parameter")
    split = _Split(body, limits.max_text_chars)
    tools, tool_choice = _tools(body)
    params = _generation(body)
    if split.images:  # refused before the history is imported, not after
        try:
            gw.refuse_images(gw.engine(engine or app_cfg.engine))
        except ThreadlineError as exc:
            raise _from_tl(exc) from None
    history = split.history
    if named:  # the client names its conversation: the stored history is the history
        cid: str | None = named
        history = []
    else:
        cid = await svc.find_conversation(scope, history) if history else None
    stream = bool(body.stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # A history no stored conversation matches is stored by the turn, once its limits admit it.
    req = TurnRequest(user=user, text=split.text, app=app_cfg.name, conversation_id=cid, engine=engine,
                      images=tuple(split.images), results=tuple(split.results), tools=tools, tool_choice=tool_choice,
                      params=params, stream=stream, instructions=tuple(split.system), key_id=caller.key_id,
                      history=tuple(history) if cid is None else ())
    agen = svc.turn(scope, req)
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


def _usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def _tool_calls(calls: list[FunctionCall]) -> list[dict[str, Any]]:
    return [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


async def _blocking(agen: AsyncGenerator[Any, None], completion_id: str, created: int, model: str,
                    headers: dict[str, str]) -> Response:
    async for ev in agen:
        if isinstance(ev, TurnFailed):
            raise _failure(ev)
        if isinstance(ev, TurnCompleted):
            r = ev.reply
            message: dict[str, Any] = {"role": "assistant", "content": r.answer or (None if r.tool_calls else ""),
                                       "refusal": None}
            if r.tool_calls:
                message["tool_calls"] = _tool_calls(r.tool_calls)
            if r.reasoning:
                message["reasoning_content"] = r.reasoning
            return Response(orjson.dumps({
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": r.finish_reason or "stop"}],
                "usage": _usage(r.usage),
            }), media_type="application/json", headers=headers)
    raise OpenAIError(500, "Internal error", "api_error")


async def _sse(agen: AsyncGenerator[Any, None], cid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                         "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                                      "finish_reason": finish}]}) + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    started: set[int] = set()  # calls whose first piece (id, type, name) went out
    try:
        async for ev in agen:
            if isinstance(ev, TextDelta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, ReasoningDelta):
                yield chunk({"reasoning_content": ev.text})
            elif isinstance(ev, ToolCallDelta):
                call: dict[str, Any] = {"index": ev.index}
                if ev.index not in started:
                    started.add(ev.index)
                    call.update(id=ev.call_id or f"call_{ev.index}", type="function",
                                function={"name": ev.name or "", "arguments": ev.arguments})
                else:
                    call["function"] = {"arguments": ev.arguments}
                yield chunk({"tool_calls": [call]})
            elif isinstance(ev, TurnCompleted):
                r = ev.reply
                yield chunk({}, r.finish_reason or "stop")
                if include_usage:
                    yield b"data: " + orjson.dumps({
                        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(r.usage)}) + b"\n\n"
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


async def model(request: Request) -> Response:
    """One model the key may name (as listed by /v1/models); anything else does not exist for it."""
    try:
        caller = await _auth(request)
        model_id = request.path_params["model_id"]
        owners = dict(visible_models(state(request).gateway, caller.app))
        if model_id not in owners:
            raise OpenAIError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                              code="model_not_found", param="model")
    except OpenAIError as exc:
        return openai_error(exc)
    return Response(orjson.dumps({"id": model_id, "object": "model", "created": int(time.time()),
                                  "owned_by": owners[model_id]}), media_type="application/json")


operations = [
    Operation("POST", "/v1/chat/completions", chat_completions, "Chat Completions (OpenAI-compatible)",
              surface="openai", body=ChatCompletionRequest, response=ChatCompletion, stream=True, tags=("OpenAI",)),
    Operation("GET", "/v1/models", models, "The models the key may name: its app and the app's engines",
              surface="openai", response=ModelList, tags=("OpenAI",)),
    Operation("GET", "/v1/models/{model_id}", model, "One model the key may name (its app or one of the app's "
              "engines)", surface="openai", response=Model, tags=("OpenAI",)),
]
