"""Dify's service API (chat apps), served over any engine: same routes, fields, defaults, status
codes and error bodies as Dify 1.13 (see ../shared/fixtures/dify/), with Threadline's own ids."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import NotFoundError, ThreadlineError
from ..media import IMAGE_EXTENSIONS, guess_extension, sniff_image_type
from ..messages import (
    AnswerReplaced,
    ImagePart,
    ReasoningDelta,
    TextDelta,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
)
from .common import (
    EventStream,
    HTTPError,
    authenticate,
    dify_usage,
    from_threadline,
    json_response,
    read_json,
    spaced_json,
    state,
)

NIL = "00000000-0000-0000-0000-000000000000"
PING_INTERVAL = 10.0
BLOCKED_EXTENSIONS = {"exe", "bat", "cmd", "com", "scr", "vbs", "ps1", "msi", "dll"}
SIZE_LIMITS_MB = {"image": 10, "video": 100, "audio": 50, "other": 15}


def _validation(model: str, field: str, msg: str, kind: str, value: Any) -> HTTPError:
    return HTTPError(400, "invalid_param",
                     f"1 validation error for {model}\n{field}\n  {msg} [type={kind}, input_value={value!r}, "
                     f"input_type={type(value).__name__}]")


def _is_uuid(v: str) -> bool:
    try:
        uuid.UUID(v)
        return True
    except ValueError:
        return False


def _user_from_json(body: dict[str, Any]) -> str:
    user = body.get("user")
    if not user or not isinstance(user, str):
        raise HTTPError(400, "invalid_param", "Arg user must be provided.")
    return user


def _ts(v: float) -> int:
    return int(v)


# ---- POST /chat-messages ---------------------------------------------------------------------------


def _parse_files(files: Any) -> tuple[list[ImagePart], list[str]]:
    if files is None:
        return [], []
    if not isinstance(files, list):
        raise _validation("ChatRequestPayload", "files", "Input should be a valid list", "list_type", files)
    images: list[ImagePart] = []
    uploads: list[str] = []
    for f in files:
        if not isinstance(f, dict):
            raise HTTPError(400, "invalid_param", "Invalid file item")
        method = f.get("transfer_method")
        if method not in ("remote_url", "local_file"):
            raise HTTPError(400, "invalid_param", f"No matching enum found for value '{method}'")
        if f.get("type", "image") != "image":
            raise HTTPError(400, "invalid_param", f"File validation failed for file: {f.get('url') or f.get('upload_file_id')}")
        if method == "remote_url":
            url = f.get("url")
            if not url or not isinstance(url, str):
                raise HTTPError(400, "invalid_param", "Invalid file url")
            images.append(ImagePart(url=url))
        else:
            fid = f.get("upload_file_id")
            if not fid:
                raise HTTPError(400, "invalid_param", "Invalid upload file id")
            uploads.append(str(fid))
    return images, uploads


async def chat_messages(request: Request) -> Response | EventStream:
    app_cfg = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(body)
    if "query" not in body:
        raise _validation("ChatRequestPayload", "query", "Field required", "missing", body)
    query = body["query"]
    if not isinstance(query, str):
        raise _validation("ChatRequestPayload", "query", "Input should be a valid string", "string_type", query)
    query = query.replace("\x00", "")
    if not query.strip():
        raise HTTPError(400, "invalid_param", "query is required")
    mode = body.get("response_mode") or "blocking"
    if mode not in ("blocking", "streaming"):
        raise _validation("ChatRequestPayload", "response_mode", "Input should be 'blocking' or 'streaming'",
                          "literal_error", mode)
    cid = body.get("conversation_id") or None
    if isinstance(cid, str):
        cid = cid.strip() or None
    if cid is not None and (not isinstance(cid, str) or not _is_uuid(cid)):
        raise _validation("ChatRequestPayload", "conversation_id",
                          "Value error, conversation_id must be a valid UUID", "value_error", cid)
    inputs = body.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise _validation("ChatRequestPayload", "inputs", "Input should be a valid dictionary", "dict_type", inputs)
    images, uploads = _parse_files(body.get("files"))
    engine = body.get("engine") if isinstance(body.get("engine"), str) else None  # Threadline extension
    include_reasoning = bool(body.get("include_reasoning"))  # Threadline extension
    gw = state(request).gateway
    agen = gw.turn(query, user=user, app=app_cfg.name, conversation_id=cid, engine=engine, images=images,
                   files=uploads, stream=mode == "streaming", inputs=inputs,
                   workflow_id=body.get("workflow_id"), auto_generate_name=body.get("auto_generate_name", True) is not False)
    try:
        first = await agen.__anext__()
    except NotFoundError as exc:
        raise HTTPError(404, "not_found", exc.message) from None
    except ThreadlineError as exc:
        raise from_threadline(exc) from None
    assert isinstance(first, TurnStarted)
    if mode == "blocking":
        async with contextlib.aclosing(agen):  # closed here, not by a finalizer task later
            return await _blocking(agen, first)
    return EventStream(_stream(request, agen, first, include_reasoning),
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _blocking(agen: AsyncIterator[Any], started: TurnStarted) -> Response:
    async for ev in agen:
        if isinstance(ev, TurnFailed):
            err = ev.error
            if isinstance(err, ThreadlineError):
                raise HTTPError(err.status, err.code, err.message)
            raise HTTPError(500, "internal_server_error", "Internal Server Error, please contact support.")
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


async def _stream(request: Request, agen: AsyncIterator[Any], started: TurnStarted,
                  include_reasoning: bool) -> AsyncIterator[bytes]:
    env = {"conversation_id": started.conversation_id, "message_id": started.message_id,
           "created_at": _ts(started.created_at)}
    yield b"event: ping\n\n"
    queue: asyncio.Queue[Any] = asyncio.Queue()

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
                yield _frame({"event": "message", **env, "task_id": started.task_id, "id": started.message_id,
                              "answer": ev.text, "from_variable_selector": None})
            elif isinstance(ev, ReasoningDelta):
                if include_reasoning:
                    yield _frame({"event": "reasoning", **env, "task_id": started.task_id, "id": started.message_id,
                                  "reasoning": ev.text})
            elif isinstance(ev, AnswerReplaced):
                yield _frame({"event": "message_replace", **env, "task_id": started.task_id, "answer": ev.text,
                              "reason": ev.reason or ""})
            elif isinstance(ev, TurnCompleted):
                r = ev.reply
                yield _frame({"event": "message_end", **env, "task_id": started.task_id, "id": started.message_id,
                              "metadata": {"annotation_reply": None, "retriever_resources": [],
                                           "usage": dify_usage(r.usage.to_json(), r.price, r.latency, r.time_to_first_token),
                                           "status": r.status, "engine": r.engine},
                              "files": []})
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
    app_cfg = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(body)
    await state(request).gateway.stop(request.path_params["task_id"], user=user, app=app_cfg.name)
    return json_response({"result": "success"})


# ---- files ------------------------------------------------------------------------------------------


async def upload(request: Request) -> Response:
    app_cfg = await authenticate(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPError(400, "no_file_uploaded", "Please upload your file.")
    form = await request.form(max_part_size=101 * 1024 * 1024)
    files = [v for k, v in form.multi_items() if k == "file" and hasattr(v, "filename")]
    if not files:
        raise HTTPError(400, "no_file_uploaded", "Please upload your file.")
    if len([v for _, v in form.multi_items() if hasattr(v, "filename")]) > 1:
        raise HTTPError(400, "too_many_files", "Only one file is allowed.")
    f = files[0]
    if not f.filename:
        raise HTTPError(400, "filename_not_exists_error", "The specified filename does not exist.")
    ext = guess_extension(f.filename)
    if ext in BLOCKED_EXTENSIONS:
        raise HTTPError(400, "invalid_param", f"File extension '.{ext}' is not allowed for security reasons")
    data = await f.read()
    kind = "image" if ext in IMAGE_EXTENSIONS else "other"
    if len(data) > SIZE_LIMITS_MB[kind] * 1024 * 1024:
        raise HTTPError(413, "file_too_large", f"File size exceeded. {len(data)} > {SIZE_LIMITS_MB[kind]} MB")
    mime = f.content_type or sniff_image_type(data) or "application/octet-stream"
    user = str(form.get("user") or "DEFAULT-USER")
    row = await state(request).gateway.store.add_file(app=app_cfg.name, user=user, name=f.filename, data=data,
                                                     mime_type=mime, extension=ext)
    return json_response({
        "id": row["id"], "name": row["name"], "size": row["size"], "extension": ext, "mime_type": mime,
        "created_by": user, "created_at": _ts(row["created_at"]), "preview_url": None,
        "source_url": f"/v1/files/{row['id']}/preview", "original_url": None, "user_id": None, "tenant_id": None,
        "conversation_id": None, "file_key": None,
    }, status=201)


async def file_preview(request: Request) -> Response:
    app_cfg = await authenticate(request)
    user = request.query_params.get("user")
    try:
        f = await state(request).gateway.store.get_file(request.path_params["file_id"], app=app_cfg.name, user=user)
    except ThreadlineError:
        raise HTTPError(404, "not_found", "File Not Exists.") from None
    return Response(f["data"], media_type=f["mime_type"])


# ---- history -------------------------------------------------------------------------------------


def _limit(request: Request, model: str) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return 20
    try:
        n = int(raw)
    except ValueError:
        raise _validation(model, "limit", "Input should be a valid integer", "int_parsing", raw) from None
    if n > 100:
        raise _validation(model, "limit", "Input should be less than or equal to 100", "less_than_equal", raw)
    if n < 1:
        raise _validation(model, "limit", "Input should be greater than or equal to 1", "greater_than_equal", raw)
    return n


def _message_files(user_msg: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for p in (user_msg or {}).get("parts") or []:
        if p.get("type") != "image":
            continue
        fid = p.get("file_id")
        out.append({"id": fid or str(uuid.uuid5(uuid.NAMESPACE_URL, p.get("url", ""))), "filename": p.get("name") or "",
                    "type": "image", "url": p.get("url") or f"/v1/files/{fid}/preview", "mime_type": p.get("mime_type"),
                    "size": None, "transfer_method": "local_file" if fid else "remote_url", "belongs_to": "user",
                    "upload_file_id": fid})
    return out


def _dify_status(status: str) -> str:
    return "error" if status == "failed" else "normal"


def render_turn(conv_id: str, user_msg: dict[str, Any] | None, a: dict[str, Any]) -> dict[str, Any]:
    usage = a.get("usage") or {}
    err = a.get("error")
    return {
        "id": a["id"], "conversation_id": conv_id, "parent_message_id": NIL,
        "inputs": (user_msg or {}).get("inputs") or {}, "query": (user_msg or {}).get("content", ""),
        "answer": a.get("content") or "", "feedback": a.get("feedback"), "retriever_resources": [],
        "created_at": _ts(a["created_at"]), "agent_thoughts": [], "message_files": _message_files(user_msg),
        "status": _dify_status(a["status"]), "error": (err or {}).get("message") if err else None,
        "extra_contents": [],
        # Threadline additions (Dify clients ignore unknown keys):
        "message_tokens": int(usage.get("prompt_tokens") or 0), "answer_tokens": int(usage.get("completion_tokens") or 0),
        "total_tokens": int(usage.get("total_tokens") or 0), "provider_response_latency": a.get("latency") or 0.0,
        "total_price": str((a.get("price") or {}).get("total_price", "0")),
        "currency": (a.get("price") or {}).get("currency", "USD"),
        "reasoning": a.get("reasoning"), "engine": a.get("engine"), "model": a.get("model"),
        "threadline_status": a["status"],
    }


async def messages(request: Request) -> Response:
    app_cfg = await authenticate(request)
    q = request.query_params
    user = q.get("user") or "DEFAULT-USER"
    if "conversation_id" not in q:
        raise _validation("MessageListQuery", "conversation_id", "Field required", "missing", {"user": user})
    limit = _limit(request, "MessageListQuery")
    cid = q.get("conversation_id") or ""
    if not cid:
        return json_response({"limit": limit, "has_more": False, "data": []})
    store = state(request).gateway.store
    try:
        await store.get_conversation(cid, app=app_cfg.name, user=user)
        page, more = await store.turns_page(cid, first_id=q.get("first_id") or None, limit=limit)
    except NotFoundError as exc:
        raise HTTPError(404, "not_found", exc.message) from None
    return json_response({"limit": limit, "has_more": more, "data": [render_turn(cid, u, a) for u, a in page]})


def render_conversation(c: dict[str, Any], intro: str) -> dict[str, Any]:
    return {"id": c["id"], "name": c["name"], "inputs": c.get("inputs") or {}, "status": "normal",
            "introduction": intro, "created_at": _ts(c["created_at"]), "updated_at": _ts(c["updated_at"]),
            "engine": c.get("engine")}  # Threadline addition: the engine of the latest turn


async def conversations(request: Request) -> Response:
    app_cfg = await authenticate(request)
    q = request.query_params
    user = q.get("user") or "DEFAULT-USER"
    limit = _limit(request, "ConversationListQuery")
    sort_by = q.get("sort_by") or "-updated_at"
    if sort_by not in ("created_at", "-created_at", "updated_at", "-updated_at"):
        raise _validation("ConversationListQuery", "sort_by",
                          "Input should be 'created_at', '-created_at', 'updated_at' or '-updated_at'", "literal_error",
                          sort_by)
    try:
        rows, more = await state(request).gateway.store.list_conversations(
            app=app_cfg.name, user=user, last_id=q.get("last_id") or None, limit=limit, sort_by=sort_by)
    except NotFoundError as exc:
        raise HTTPError(404, "not_found", exc.message) from None
    return json_response({"limit": limit, "has_more": more,
                          "data": [render_conversation(r, app_cfg.opening_statement) for r in rows]})


async def rename(request: Request) -> Response:
    app_cfg = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(body)
    name = body.get("name")
    auto = bool(body.get("auto_generate", False))
    store = state(request).gateway.store
    cid = request.path_params["conversation_id"]
    try:
        conv = await store.get_conversation(cid, app=app_cfg.name, user=user)
        if auto:
            first, _ = await store.turns_page(cid, first_id=None, limit=1)
            name = conv["name"] or (first[0][0]["content"][:60] if first and first[0][0] else "New conversation")
        elif not isinstance(name, str) or not name.strip():
            raise HTTPError(400, "invalid_param",
                            "1 validation error for ConversationRenamePayload\n  Value error, name is required when "
                            "auto_generate is false [type=value_error]")
        conv = await store.rename_conversation(cid, app=app_cfg.name, user=user, name=name.strip())
    except NotFoundError:
        raise HTTPError(404, "not_found", "Conversation Not Exists.") from None
    return json_response(render_conversation(conv, app_cfg.opening_statement))


async def delete_conversation(request: Request) -> Response:
    app_cfg = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(body)
    try:
        await state(request).gateway.store.delete_conversation(request.path_params["conversation_id"],
                                                               app=app_cfg.name, user=user)
    except NotFoundError:
        raise HTTPError(404, "not_found", "Conversation Not Exists.") from None
    return Response(status_code=204, media_type="application/json")


async def feedback(request: Request) -> Response:
    app_cfg = await authenticate(request)
    body = await read_json(request)
    user = _user_from_json(body)
    store = state(request).gateway.store
    msg = await store.get_message(request.path_params["message_id"])
    if msg is None or msg["role"] != "assistant":
        raise HTTPError(404, "not_found", "Message Not Exists.")
    try:
        await store.get_conversation(msg["conversation_id"], app=app_cfg.name, user=user)
    except NotFoundError:
        raise HTTPError(404, "not_found", "Message Not Exists.") from None
    rating = body.get("rating")
    if rating not in ("like", "dislike", None):
        raise HTTPError(400, "invalid_param", "rating must be 'like', 'dislike' or null")
    if rating is None and not msg.get("feedback"):
        raise HTTPError(400, "invalid_param", "rating cannot be None when feedback not exists")
    await store.update_message(msg["id"], feedback={"rating": rating, "content": body.get("content")} if rating else None)
    return json_response({"result": "success"})


async def suggested(request: Request) -> Response:
    await authenticate(request)
    raise HTTPError(400, "bad_request", "Suggested Questions Is Disabled.")


# ---- app info ---------------------------------------------------------------------------------------


async def parameters(request: Request) -> Response:
    app_cfg = await authenticate(request)
    return json_response({
        "opening_statement": app_cfg.opening_statement, "suggested_questions": app_cfg.suggested_questions,
        "suggested_questions_after_answer": {"enabled": False}, "speech_to_text": {"enabled": False},
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
    app_cfg = await authenticate(request)
    return json_response({"name": app_cfg.name, "description": app_cfg.description, "tags": [],
                          "mode": "advanced-chat", "author_name": "threadline",
                          "engine": app_cfg.engine})  # Threadline addition: the app's default engine


async def meta(request: Request) -> Response:
    await authenticate(request)
    return json_response({"tool_icons": {}})


routes = [
    Route("/v1/chat-messages", chat_messages, methods=["POST"]),
    Route("/v1/chat-messages/{task_id}/stop", stop, methods=["POST"]),
    Route("/v1/files/upload", upload, methods=["POST"]),
    Route("/v1/files/{file_id}/preview", file_preview, methods=["GET"]),
    Route("/v1/messages", messages, methods=["GET"]),
    Route("/v1/messages/{message_id}/feedbacks", feedback, methods=["POST"]),
    Route("/v1/messages/{message_id}/suggested", suggested, methods=["GET"]),
    Route("/v1/conversations", conversations, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/name", rename, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/v1/parameters", parameters, methods=["GET"]),
    Route("/v1/info", info, methods=["GET"]),
    Route("/v1/meta", meta, methods=["GET"]),
]
