"""Dify's service API (chat apps), served over any engine: same routes, fields, defaults, status
codes and error bodies as Dify 1.13 (see ../shared/fixtures/dify/), with Threadline's own ids."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ..engines.dify import thought_fields
from ..errors import InvalidParamError, NotFoundError, ThreadlineError
from ..media import IMAGE_EXTENSIONS, guess_extension, sniff_image_type
from ..messages import (
    AgentStep,
    AnswerReplaced,
    FunctionCall,
    FunctionResult,
    ImagePart,
    ReasoningDelta,
    Reply,
    TextDelta,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    items_from_json,
)
from ..service import Scope
from ..turns import TurnRequest
from .common import (
    EventStream,
    HTTPError,
    authenticate,
    check_user,
    dify_usage,
    from_threadline,
    json_response,
    read_json,
    spaced_json,
    state,
)
from .models import (
    AppFeedbackList,
    AppFeedbacksQuery,
    ChatMessageResponse,
    ChatRequestPayload,
    ConversationItem,
    ConversationList,
    ConversationListQuery,
    ConversationRenamePayload,
    FeedbackPayload,
    FileUploadResponse,
    InfoResponse,
    MessageList,
    MessageListQuery,
    MetaResponse,
    ParametersResponse,
    ResultResponse,
    SignedFileQuery,
    SuggestedResponse,
    UploadForm,
    UserPayload,
    UserQuery,
)
from .spec import Operation

NIL = "00000000-0000-0000-0000-000000000000"
PING_INTERVAL = 10.0
BLOCKED_EXTENSIONS = {"exe", "bat", "cmd", "com", "scr", "vbs", "ps1", "msi", "dll"}
SIZE_LIMITS_MB = {"image": 10, "video": 100, "audio": 50, "other": 15}


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], data: Any) -> M:
    """Validate with the route's model; the message is pydantic's own text, as Dify answers it."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise HTTPError(400, "invalid_param", str(exc)) from None


def _user_from_json(request: Request, body: dict[str, Any]) -> str:
    user = body.get("user")
    if not user or not isinstance(user, str):
        raise HTTPError(400, "invalid_param", "Arg user must be provided.")
    return check_user(request, user)


def _user_from_query(request: Request, user: str | None) -> str:
    return check_user(request, user or "DEFAULT-USER")


def _ts(v: float) -> int:
    return int(v)


# ---- POST /chat-messages ---------------------------------------------------------------------------


def _parse_files(files: list[Any] | None) -> tuple[list[ImagePart], list[str]]:
    images: list[ImagePart] = []
    uploads: list[str] = []
    for f in files or []:
        if not isinstance(f, dict):
            raise HTTPError(400, "invalid_param", "Invalid file item")
        method = f.get("transfer_method")
        if method not in ("remote_url", "local_file"):
            raise HTTPError(400, "invalid_param", f"No matching enum found for value '{method}'")
        if f.get("type", "image") != "image":
            raise HTTPError(400, "invalid_param", f"File validation failed for file: {f.get('url') or f.get('upload_file_id')}")
        if method == "remote_url":
            url = f.get("url")
            if not url or not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise HTTPError(400, "invalid_param", "Invalid file url")
            images.append(ImagePart(url=url))
        else:
            fid = f.get("upload_file_id")
            if not fid or not isinstance(fid, str):
                raise HTTPError(400, "invalid_param", "Invalid upload file id")
            uploads.append(fid)
    return images, uploads


async def chat_messages(request: Request) -> Response | EventStream:
    caller = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(request, body)
    p = _validated(ChatRequestPayload, body)
    query = p.query.replace("\x00", "")
    if not query.strip():
        raise HTTPError(400, "invalid_param", "query is required")
    limit = state(request).gateway.settings.server.max_text_chars
    if len(query) > limit:
        raise HTTPError(400, "invalid_param", f"query is longer than the limit of {limit} characters")
    mode = p.response_mode or "blocking"
    images, uploads = _parse_files(p.files)
    req = TurnRequest(user=user, text=query, app=caller.app.name, conversation_id=p.conversation_id,
                      parent_id=p.parent_message_id, engine=p.engine,
                      images=tuple(images), files=tuple(uploads), stream=mode == "streaming", inputs=p.inputs,
                      workflow_id=p.workflow_id, auto_generate_name=p.auto_generate_name, key_id=caller.key_id)
    agen = state(request).service.turn(Scope(caller.app.name, user), req)
    try:
        first = await agen.__anext__()
    except NotFoundError as exc:
        raise HTTPError(404, "not_found", exc.message) from None
    except ThreadlineError as exc:
        raise from_threadline(exc) from None
    if isinstance(first, TurnFailed):  # failed before the engine accepted: the real status, not a 200 stream
        await agen.aclose()
        raise _failure(first)
    assert isinstance(first, TurnStarted)
    if mode == "blocking":
        async with contextlib.aclosing(agen):  # closed here, not by a finalizer task later
            return await _blocking(agen, first)
    return EventStream(_stream(request, agen, first, p.include_reasoning, user),
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _failure(ev: TurnFailed) -> HTTPError:
    """A failed turn as an error answer: the error's own status, its Retry-After, and the id of the
    conversation that keeps the question (a first turn that fails still made one)."""
    err = ev.error
    headers = {"X-Threadline-Conversation-Id": ev.reply.conversation_id}
    if isinstance(err, ThreadlineError):
        if err.retry_after:
            headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
        return HTTPError(err.status, err.code, err.message, headers)
    return HTTPError(500, "internal_server_error", "Internal Server Error, please contact support.", headers)


async def _blocking(agen: AsyncGenerator[Any, None], started: TurnStarted) -> Response:
    async for ev in agen:
        if isinstance(ev, TurnFailed):
            raise _failure(ev)
        if isinstance(ev, TurnCompleted):
            r = ev.reply
            return spaced_json({
                "event": "message", "task_id": started.task_id, "id": r.message_id, "message_id": r.message_id,
                "conversation_id": r.conversation_id, "mode": "advanced-chat", "answer": r.answer,
                "metadata": {"annotation_reply": None, "retriever_resources": [],
                             "usage": dify_usage(r.usage.to_json(), r.price, r.latency, r.time_to_first_token)},
                "created_at": _ts(started.created_at),
            })
    raise HTTPError(500, "internal_server_error", "Internal Server Error, please contact support.")


def _frame(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _stopped_end(env: dict[str, Any], started: TurnStarted, r: Reply, user: str, metadata: dict[str, Any]) -> bytes:
    """How Dify 1.13 ends a stopped advanced-chat stream (fixture 070-stream-stopped.sse): a
    `workflow_finished` with status `stopped` and the answer kept, and no `message_end`. Threadline
    adds `metadata` as its `message_end` carries it (usage, status, engine; Dify's clients ignore it)."""
    finished = _ts(started.created_at + r.latency)
    run_id = str(uuid.uuid4())
    return _frame({"event": "workflow_finished", **env, "task_id": started.task_id, "workflow_run_id": run_id,
                   "metadata": metadata,
                   "data": {"id": run_id, "workflow_id": "", "status": "stopped",
                            "outputs": {"answer": r.answer, "files": []}, "error": "Stopped by user.",
                            "elapsed_time": r.latency, "total_tokens": r.usage.total_tokens, "total_steps": 0,
                            "created_by": {"id": user, "user": user}, "created_at": env["created_at"],
                            "finished_at": finished, "exceptions_count": 0, "files": []}})


async def _stream(request: Request, agen: AsyncGenerator[Any, None], started: TurnStarted,
                  include_reasoning: bool, user: str) -> AsyncIterator[bytes]:
    env = {"conversation_id": started.conversation_id, "message_id": started.message_id,
           "created_at": _ts(started.created_at)}
    yield b"event: ping\n\n"
    queue: asyncio.Queue[Any] = asyncio.Queue()
    agent = False  # an agent's stream (it told a step first): answer text goes as agent_message, as Dify's does

    async def pump() -> None:
        try:
            async for ev in agen:
                queue.put_nowait(ev)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(pump())
    try:
        while True:
            if queue.empty():  # wait, pinging now and then (a timer, not wait_for's task per event)
                try:
                    async with asyncio.timeout(PING_INTERVAL):
                        ev = await queue.get()
                except TimeoutError:
                    yield b"event: ping\n\n"
                    continue
            else:
                ev = queue.get_nowait()
            if ev is None:
                break
            if isinstance(ev, TextDelta):
                if agent:
                    yield _frame({"event": "agent_message", **env, "task_id": started.task_id,
                                  "id": started.message_id, "answer": ev.text})
                else:
                    yield _frame({"event": "message", **env, "task_id": started.task_id, "id": started.message_id,
                                  "answer": ev.text, "from_variable_selector": None})
            elif isinstance(ev, AgentStep):
                agent = True
                f = thought_fields(ev)
                yield _frame({"event": "agent_thought", **env, "task_id": started.task_id, "id": ev.id,
                              "position": ev.position, "thought": ev.thought, "observation": f["observation"],
                              "tool": f["tool"], "tool_labels": ev.tool_labels, "tool_input": f["tool_input"],
                              "message_files": list(ev.files)})
            elif isinstance(ev, ReasoningDelta):
                if include_reasoning:
                    yield _frame({"event": "reasoning", **env, "task_id": started.task_id, "id": started.message_id,
                                  "reasoning": ev.text})
            elif isinstance(ev, AnswerReplaced):
                yield _frame({"event": "message_replace", **env, "task_id": started.task_id, "answer": ev.text,
                              "reason": ev.reason or ""})
            elif isinstance(ev, TurnCompleted):
                r = ev.reply
                metadata: dict[str, Any] = {"annotation_reply": None, "retriever_resources": [],
                            "usage": dify_usage(r.usage.to_json(), r.price, r.latency, r.time_to_first_token),
                            "status": r.status, "engine": r.engine}
                if r.status == "stopped":
                    yield _stopped_end(env, started, r, user, metadata)
                else:
                    yield _frame({"event": "message_end", **env, "task_id": started.task_id,
                                  "id": started.message_id, "metadata": metadata, "files": []})
            elif isinstance(ev, TurnFailed):
                err = ev.error
                if isinstance(err, ThreadlineError):
                    code, status, message = err.code, err.status, err.message
                else:
                    code, status, message = "internal_server_error", 500, "Internal Server Error, please contact support."
                yield _frame({"event": "error", **env, "code": code, "status": status, "message": message})
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def stop(request: Request) -> Response:
    caller = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(request, body)
    await state(request).service.stop(Scope(caller.app.name, user), request.path_params["task_id"])
    return json_response({"result": "success"})


# ---- files ------------------------------------------------------------------------------------------


async def upload(request: Request) -> Response:
    caller = await authenticate(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPError(400, "no_file_uploaded", "Please upload your file.")
    form = await request.form(max_part_size=101 * 1024 * 1024)
    files = [v for k, v in form.multi_items() if k == "file" and hasattr(v, "filename")]
    if not files:
        raise HTTPError(400, "no_file_uploaded", "Please upload your file.")
    if len([v for _, v in form.multi_items() if hasattr(v, "filename")]) > 1:
        raise HTTPError(400, "too_many_files", "Only one file is allowed.")
    f = files[0]
    if isinstance(f, str) or not f.filename:
        raise HTTPError(400, "filename_not_exists_error", "The specified filename does not exist.")
    ext = guess_extension(f.filename)
    if ext in BLOCKED_EXTENSIONS:
        raise HTTPError(400, "invalid_param", f"File extension '.{ext}' is not allowed for security reasons")
    data = await f.read()
    kind = "image" if ext in IMAGE_EXTENSIONS else "other"
    if len(data) > SIZE_LIMITS_MB[kind] * 1024 * 1024:
        raise HTTPError(413, "file_too_large", f"File size exceeded. {len(data)} > {SIZE_LIMITS_MB[kind]} MB")
    mime = (f.content_type or "").split(";", 1)[0].strip().lower() or sniff_image_type(data) or "application/octet-stream"
    raw_user = form.get("user")
    user = _user_from_query(request, raw_user if isinstance(raw_user, str) else None)
    name = f.filename.replace("\x00", "")[:255]
    row = await state(request).service.upload(Scope(caller.app.name, user), name=name, data=data, mime_type=mime,
                                              extension=ext)
    file_url = await signed_file_urls(request)
    return json_response({
        "id": row["id"], "name": row["name"], "size": row["size"], "extension": ext, "mime_type": mime,
        "created_by": user, "created_at": _ts(row["created_at"]), "preview_url": None,
        "source_url": file_url(row["id"]), "original_url": None, "user_id": None, "tenant_id": None,
        "conversation_id": None, "file_key": None,
    }, status=201)


async def signed_file_urls(request: Request) -> Callable[[str], str]:
    """Absolute, signed, expiring URLs of files for this request's caller (who may see them), as
    Dify gives: a browser loads them with no app key, from any origin (server/signed_files.py)."""
    st = state(request)
    signer = await st.file_signer()
    origin = st.public_origin(request)
    return lambda file_id: signer.url(origin, file_id)


# Served inline only when a browser renders them as a picture and nothing else. Anything else an
# upload may be (HTML, SVG with script, XML, PDF, ...) would run in this server's origin if opened
# inline: it is sent as an attachment, typed as bytes, and sandboxed.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


async def file_preview(request: Request) -> Response:
    caller = await authenticate(request)
    q = _validated(UserQuery, dict(request.query_params))
    if not q.user:
        raise HTTPError(400, "invalid_param", "Arg user must be provided.")
    user = check_user(request, q.user)
    try:
        f = await state(request).service.file(Scope(caller.app.name, user), request.path_params["file_id"])
    except ThreadlineError:
        raise HTTPError(404, "not_found", "File Not Exists.") from None
    return _file_response(f)


async def signed_file_preview(request: Request) -> Response:
    """A file through its signed URL: no app key; only the server's signature for this very file,
    within its time. The signature is checked before the store is asked anything."""
    q = _validated(SignedFileQuery, dict(request.query_params))
    file_id = request.path_params["file_id"]
    signer = await state(request).file_signer()
    if not signer.verify(file_id, q.timestamp, q.nonce, q.sign):
        raise HTTPError(404, "not_found", "File not found or signature is invalid")  # as Dify: NotFound
    try:
        f = await state(request).service.signed_file(file_id)
    except ThreadlineError:
        raise HTTPError(404, "not_found", "File Not Exists.") from None
    return _file_response(f)


def _file_response(f: dict[str, Any]) -> Response:
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
               "Cache-Control": "private, max-age=300"}
    mime = f["mime_type"]
    if mime in INLINE_TYPES:
        return Response(f["data"], media_type=mime, headers=headers)
    safe_name = "".join(c for c in f["name"] if c.isalnum() or c in "._- ")[:100] or "file"
    headers["Content-Disposition"] = f'attachment; filename="{safe_name}"'
    return Response(f["data"], media_type="application/octet-stream", headers=headers)


# ---- history -------------------------------------------------------------------------------------


def _query(request: Request, model: type[M]) -> M:
    """A route's query parameters through its model; an empty value counts as absent."""
    return _validated(model, {k: v for k, v in request.query_params.items() if v != ""})


def _message_files(user_msg: dict[str, Any] | None, file_url: Callable[[str], str]) -> list[dict[str, Any]]:
    out = []
    for p in (user_msg or {}).get("parts") or []:
        if p.get("type") != "image":
            continue
        fid = p.get("file_id")
        url = file_url(fid) if fid else p.get("url") or ""
        out.append({"id": fid or str(uuid.uuid5(uuid.NAMESPACE_URL, p.get("url", ""))), "filename": p.get("name") or "",
                    "type": "image", "url": url, "mime_type": p.get("mime_type"),
                    "size": None, "transfer_method": "local_file" if fid else "remote_url", "belongs_to": "user",
                    "upload_file_id": fid})
    return out


def _dify_status(status: str) -> str:
    return "error" if status == "failed" else "normal"


def _agent_thoughts(a: dict[str, Any]) -> list[dict[str, Any]]:
    """An answer's agent steps as Dify lists them (fields/message_fields.py agent_thought_fields)."""
    out = []
    for p in a.get("parts") or []:
        if p.get("type") != "agent_step":
            continue
        step = AgentStep.from_json(p)
        f = thought_fields(step)
        out.append({"id": step.id, "chain_id": None, "message_id": a["id"], "position": step.position,
                    "thought": step.thought, "tool": f["tool"], "tool_labels": step.tool_labels,
                    "tool_input": f["tool_input"], "created_at": step.created_at or _ts(a["created_at"]),
                    "observation": f["observation"], "files": list(step.files)})
    return out


def _feedback(fb: dict[str, Any] | None) -> dict[str, Any] | None:
    """A message's feedback as /messages shows it: the rating (Dify's) and its content (Threadline's)."""
    return {"rating": fb.get("rating"), "content": fb.get("content")} if fb else None


def render_turn(conv_id: str, user_msg: dict[str, Any] | None, a: dict[str, Any],
                file_url: Callable[[str], str]) -> dict[str, Any]:
    usage = a.get("usage") or {}
    err = a.get("error")
    return {
        # The answer a question continued from when it started a branch; NIL otherwise, as Dify's
        # service API records every message it makes (its conversations are linear).
        "id": a["id"], "conversation_id": conv_id, "parent_message_id": (user_msg or {}).get("parent_id") or NIL,
        "inputs": (user_msg or {}).get("inputs") or {}, "query": (user_msg or {}).get("content", ""),
        "answer": a.get("content") or "", "feedback": _feedback(a.get("feedback")), "retriever_resources": [],
        "created_at": _ts(a["created_at"]), "agent_thoughts": _agent_thoughts(a),
        "message_files": _message_files(user_msg, file_url),
        "status": _dify_status(a["status"]), "error": (err or {}).get("message") if err else None,
        "extra_contents": [],
        # Threadline additions (Dify clients ignore unknown keys):
        "message_tokens": int(usage.get("prompt_tokens") or 0), "answer_tokens": int(usage.get("completion_tokens") or 0),
        "total_tokens": int(usage.get("total_tokens") or 0), "provider_response_latency": a.get("latency") or 0.0,
        "total_price": str((a.get("price") or {}).get("total_price", "0")),
        "currency": (a.get("price") or {}).get("currency", "USD"),
        "reasoning": a.get("reasoning"), "engine": a.get("engine"), "model": a.get("model"),
        "threadline_status": a["status"],
        # Caller-defined function calls (a Responses or Chat Completions client's tools): the ones the
        # answer made, and the outputs its question carried (they answer the answer before).
        "tool_calls": [{"call_id": i.call_id, "name": i.name, "arguments": i.arguments}
                       for i in items_from_json(a.get("parts")) if isinstance(i, FunctionCall)],
        "tool_results": [{"call_id": i.call_id, "name": i.name, "output": i.output}
                         for i in items_from_json((user_msg or {}).get("parts")) if isinstance(i, FunctionResult)],
    }


async def messages(request: Request) -> Response:
    caller = await authenticate(request)
    raw = dict(request.query_params)
    if "conversation_id" not in raw:
        raise _validation_missing(MessageListQuery, raw)
    q = _query(request, MessageListQuery)
    user = _user_from_query(request, q.user)
    if not raw.get("conversation_id"):
        return json_response({"limit": q.limit, "has_more": False, "data": []})
    cid = raw["conversation_id"]
    try:
        page, more = await state(request).service.turns(Scope(caller.app.name, user), cid, first_id=q.first_id,
                                                         limit=q.limit)
    except NotFoundError as exc:
        raise HTTPError(404, "not_found", exc.message) from None
    file_url = await signed_file_urls(request)
    return json_response({"limit": q.limit, "has_more": more,
                          "data": [render_turn(cid, u, a, file_url) for u, a in page]})


def _validation_missing(model: type[M], raw: dict[str, Any]) -> HTTPError:
    try:
        model.model_validate(raw)
    except ValidationError as exc:
        return HTTPError(400, "invalid_param", str(exc))
    return HTTPError(400, "invalid_param", "invalid query")


def render_conversation(c: dict[str, Any], intro: str) -> dict[str, Any]:
    return {"id": c["id"], "name": c["name"], "inputs": c.get("inputs") or {}, "status": "normal",
            "introduction": intro, "created_at": _ts(c["created_at"]), "updated_at": _ts(c["updated_at"]),
            "engine": c.get("engine")}  # Threadline addition: the engine of the latest turn


async def conversations(request: Request) -> Response:
    caller = await authenticate(request)
    q = _query(request, ConversationListQuery)
    user = _user_from_query(request, q.user)
    try:
        rows, more = await state(request).service.conversations(Scope(caller.app.name, user), last_id=q.last_id,
                                                                 limit=q.limit, sort_by=q.sort_by)
    except NotFoundError as exc:
        raise HTTPError(404, "not_found", exc.message) from None
    return json_response({"limit": q.limit, "has_more": more,
                          "data": [render_conversation(r, caller.app.opening_statement) for r in rows]})


async def rename(request: Request) -> Response:
    caller = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(request, body)
    p = _validated(ConversationRenamePayload, body)
    cid = request.path_params["conversation_id"]
    try:
        conv = await state(request).service.rename(Scope(caller.app.name, user), cid, p.name,
                                                   auto_generate=bool(p.auto_generate))
    except NotFoundError:
        raise HTTPError(404, "not_found", "Conversation Not Exists.") from None
    except InvalidParamError as exc:
        raise HTTPError(400, "invalid_param", exc.message) from None
    return json_response(render_conversation(conv, caller.app.opening_statement))


async def delete_conversation(request: Request) -> Response:
    caller = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(request, body)
    try:
        await state(request).service.delete(Scope(caller.app.name, user), request.path_params["conversation_id"])
    except NotFoundError:
        raise HTTPError(404, "not_found", "Conversation Not Exists.") from None
    return Response(status_code=204, media_type="application/json")


async def feedback(request: Request) -> Response:
    caller = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(request, body)
    p = _validated(FeedbackPayload, body)
    try:
        await state(request).service.feedback(Scope(caller.app.name, user), request.path_params["message_id"],
                                              p.rating, p.content)
    except NotFoundError:
        raise HTTPError(404, "not_found", "Message Not Exists.") from None
    except InvalidParamError as exc:
        raise HTTPError(400, "invalid_param", exc.message) from None
    return json_response({"result": "success"})


def _iso(ts: float) -> str:
    """Dify's feedback times: UTC, ISO 8601 to the second, no zone (MessageFeedback.to_dict)."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).replace(tzinfo=None).isoformat(timespec="seconds")


async def app_feedbacks(request: Request) -> Response:
    """GET /v1/app/feedbacks: the app's feedbacks, newest first, paged by `page` and `limit` (Dify's
    shape: `{"data": [...]}` with no `has_more`). The key's app only; `user` is not needed."""
    caller = await authenticate(request)
    q = _query(request, AppFeedbacksQuery)
    app = caller.app.name
    rows = await state(request).service.app_feedbacks(app, page=q.page, limit=q.limit)
    data = []
    for r in rows:
        fb = r["feedback"]
        created = fb.get("created_at") or r["updated_at"]
        data.append({
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"threadline:feedback:{r['id']}")), "app_id": app,
            "conversation_id": r["conversation_id"], "message_id": r["id"], "rating": fb.get("rating"),
            "content": fb.get("content"), "from_source": "user", "from_end_user_id": r["_user"],
            "from_account_id": None, "created_at": _iso(created), "updated_at": _iso(fb.get("updated_at") or created),
        })
    return json_response({"data": data})


async def suggested(request: Request) -> Response:
    """Dify's order (message_service.get_suggested_questions_after_answer): `user` is required, the
    message must be the caller's (404 otherwise), then the app must suggest (recording 121's 400
    otherwise)."""
    caller = await authenticate(request)
    q = _query(request, UserQuery)
    if not q.user:
        raise HTTPError(400, "invalid_param", "Arg user must be provided.")
    user = check_user(request, q.user)
    try:
        data = await state(request).service.suggested(Scope(caller.app.name, user), request.path_params["message_id"])
    except NotFoundError:
        raise HTTPError(404, "not_found", "Message Not Exists.") from None
    except ThreadlineError as exc:
        raise from_threadline(exc) from None
    return json_response({"result": "success", "data": data})


# ---- app info ---------------------------------------------------------------------------------------


async def parameters(request: Request) -> Response:
    app_cfg = (await authenticate(request)).app
    return json_response({
        "opening_statement": app_cfg.opening_statement, "suggested_questions": app_cfg.suggested_questions,
        "suggested_questions_after_answer": {"enabled": app_cfg.suggested_questions_after_answer},
        "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False, "language": "", "voice": ""}, "retriever_resource": {"enabled": False},
        "annotation_reply": {"enabled": False}, "more_like_this": {"enabled": False}, "user_input_form": [],
        "sensitive_word_avoidance": {"enabled": False},
        "file_upload": {"allowed_file_extensions": [".JPG", ".JPEG", ".PNG", ".GIF", ".WEBP", ".SVG"],
                        "allowed_file_types": ["image"], "allowed_file_upload_methods": ["local_file", "remote_url"],
                        "enabled": True, "fileUploadConfig": {"audio_file_size_limit": 50, "batch_count_limit": 5,
                                                              "file_size_limit": 15, "image_file_size_limit": 10,
                                                              "video_file_size_limit": 100,
                                                              "workflow_file_upload_limit": 10},
                        "number_limits": 3},
        "system_parameters": {"image_file_size_limit": 10, "video_file_size_limit": 100, "audio_file_size_limit": 50,
                              "file_size_limit": 15, "workflow_file_upload_limit": 10},
    })


async def info(request: Request) -> Response:
    app_cfg = (await authenticate(request)).app
    return json_response({"name": app_cfg.name, "description": app_cfg.description, "tags": [],
                          "mode": "advanced-chat", "author_name": "threadline",
                          "engine": app_cfg.engine})  # Threadline addition: the app's default engine


async def meta(request: Request) -> Response:
    await authenticate(request)
    return json_response({"tool_icons": {}})


_CHAT = "Chat"
_FILES = "Files"
_HISTORY = "Conversations and messages"
_APP = "App"

operations = [
    Operation("POST", "/v1/chat-messages", chat_messages, "Send a chat message (blocking or streaming)",
              body=ChatRequestPayload, response=ChatMessageResponse, stream=True, tags=(_CHAT,)),
    Operation("POST", "/v1/chat-messages/{task_id}/stop", stop, "Stop a streaming answer", body=UserPayload,
              response=ResultResponse, tags=(_CHAT,)),
    Operation("POST", "/v1/files/upload", upload, "Upload a file (an image to attach to a message)",
              body=UploadForm, body_media="multipart/form-data", ok_status=201, response=FileUploadResponse,
              tags=(_FILES,)),
    Operation("GET", "/v1/files/{file_id}/preview", file_preview, "Download an uploaded file (its owner only)",
              query=UserQuery, raw_media="*/*", tags=(_FILES,)),
    # The URL /v1/messages and an upload give for a file: Dify's path, outside /v1, and no app key.
    Operation("GET", "/files/{file_id}/file-preview", signed_file_preview,
              "Download a file through its signed URL (no app key; valid for [server] file_url_ttl seconds)",
              query=SignedFileQuery, raw_media="*/*", public=True, tags=(_FILES,)),
    Operation("GET", "/v1/messages", messages, "A conversation's messages, newest page first",
              query=MessageListQuery, response=MessageList, tags=(_HISTORY,)),
    Operation("POST", "/v1/messages/{message_id}/feedbacks", feedback, "Rate an answer", body=FeedbackPayload,
              response=ResultResponse, tags=(_HISTORY,)),
    Operation("GET", "/v1/messages/{message_id}/suggested", suggested,
              "Suggested next questions after an answer (apps with suggested_questions_after_answer)",
              query=UserQuery, response=SuggestedResponse, tags=(_HISTORY,)),
    Operation("GET", "/v1/app/feedbacks", app_feedbacks, "The app's feedbacks on its answers, newest first",
              query=AppFeedbacksQuery, response=AppFeedbackList, tags=(_APP,)),
    Operation("GET", "/v1/conversations", conversations, "A user's conversations", query=ConversationListQuery,
              response=ConversationList, tags=(_HISTORY,)),
    Operation("POST", "/v1/conversations/{conversation_id}/name", rename, "Rename a conversation",
              body=ConversationRenamePayload, response=ConversationItem, tags=(_HISTORY,)),
    # DELETE /v1/conversations/{id} is shared with OpenAI's Conversations API: conversations_api.delete
    # tells them apart and hands a bare UUID to delete_conversation here.
    Operation("GET", "/v1/parameters", parameters, "The app's input form, opening statement and file settings",
              response=ParametersResponse, tags=(_APP,)),
    Operation("GET", "/v1/info", info, "The app's name and mode", response=InfoResponse, tags=(_APP,)),
    Operation("GET", "/v1/meta", meta, "Tool icons", response=MetaResponse, tags=(_APP,)),
]
