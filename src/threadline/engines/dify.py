"""Dify, the stateful engine: Dify keeps the conversation; Threadline passes Dify's own id through
(and still stores every turn itself). The query is only the user's text, never packed history —
except the first Dify turn of a conversation Dify has not seen, which the gateway seeds.

SSE is parsed as Dify really sends it (../shared/fixtures/dify/): a bare `event: ping` first,
`data:` frames with compact or spaced JSON, no `[DONE]`, `message_end` before `workflow_finished`,
and a failing workflow that ends with `workflow_finished: failed` and no `error` event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from ..errors import (
    FileTooLargeError,
    InvalidParamError,
    ProviderAuthError,
    RemoteConversationLost,
    UnsupportedFileTypeError,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamNotFoundError,
    UpstreamTruncated,
    UpstreamUnavailableError,
    WorkflowFailedError,
    redact,
    upstream_error_from_status,
)
from ..media import split_data_uri
from ..messages import (
    AgentStep,
    AnswerReplaced,
    EngineEvent,
    Finished,
    FunctionCall,
    FunctionResult,
    RemoteState,
    TextDelta,
    UpstreamAccepted,
    Usage,
    UsageReport,
)
from . import retry
from .base import Engine, EngineRequest
from .http import Poster, UpstreamResponse
from .sse import iter_sse

# Fields of POST /chat-messages that Threadline sends (reference §2.1): nothing else, ever.
DIFY_FIELDS = frozenset({"inputs", "query", "response_mode", "conversation_id", "user", "files", "auto_generate_name",
                         "workflow_id"})
# An agent app refuses blocking mode with this 400 (core/app/apps/agent_chat/app_generator.py), before it
# creates anything: the engine then asks again in streaming mode and reads the stream whole.
NO_BLOCKING = "does not support blocking mode"
# Dify sends nothing for an unknown conversation in streaming mode (fixture 082: ping, then 300 s of silence).
FIRST_EVENT_TIMEOUT = 20.0
# Dify ids of files uploaded to the app, per (file, remote user): a replayed image is not uploaded again.
MAX_CACHED_UPLOADS = 4096

log = logging.getLogger("threadline.engines")


def _json_text(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def _keyed(raw: Any, names: list[str]) -> dict[str, Any] | None:
    """Dify writes a thought's tool_input and observation as JSON objects keyed by tool name."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return d if isinstance(d, dict) and all(n in d for n in names) else None


def step_from_thought(data: dict[str, Any], created_at: int) -> AgentStep:
    """A Dify `agent_thought` event as an AgentStep. Dify's agent runners (function calling and
    ReAct alike) write `tool` as the tool names joined by ";", `tool_input` as `{name: arguments}`
    and `observation` as `{name: output}`, each JSON text; a single tool's call id is the thought's
    id (several: `<id>.1`, `<id>.2`, ...). Text that is not keyed that way is kept whole."""
    tid = str(data.get("id") or "")
    names = [n for n in str(data.get("tool") or "").split(";") if n]
    ids = [tid] if len(names) == 1 else [f"{tid}.{i}" for i in range(1, len(names) + 1)]
    raw_in, raw_out = data.get("tool_input"), data.get("observation")
    inputs, outputs = _keyed(raw_in, names), _keyed(raw_out, names)
    calls: list[FunctionCall] = []
    results: list[FunctionResult] = []
    for cid, name in zip(ids, names, strict=True):
        if inputs is not None:
            args = _json_text(inputs[name])
        else:
            args = str(raw_in) if len(names) == 1 and raw_in else "{}"
        calls.append(FunctionCall(cid, name, args))
        if outputs is not None:
            results.append(FunctionResult(cid, _json_text(outputs[name]), name))
        elif len(names) == 1 and isinstance(raw_out, str) and raw_out:
            results.append(FunctionResult(cid, raw_out, name))
    labels = data.get("tool_labels")
    files = data.get("message_files")
    return AgentStep(tid, int(data.get("position") or 1), str(data.get("thought") or ""), tuple(calls),
                     tuple(results), labels if isinstance(labels, dict) else {},
                     tuple(str(f) for f in files) if isinstance(files, list) else (), created_at)


def _args_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _py_json(v: Any) -> str:
    """JSON text as Dify's Python writes it (json.dumps, ensure_ascii=False: ", " and ": ")."""
    return json.dumps(v, ensure_ascii=False)


def thought_fields(step: AgentStep) -> dict[str, str]:
    """An AgentStep back in Dify's words: `tool`, `tool_input` and `observation` as Dify writes them."""
    if not step.calls:
        return {"tool": "", "tool_input": "", "observation": ""}
    outputs = {r.call_id: r.output for r in step.results}
    observation = ""
    if step.results:
        observation = _py_json({c.name: outputs[c.call_id] for c in step.calls if c.call_id in outputs})
    return {"tool": ";".join(c.name for c in step.calls),
            "tool_input": _py_json({c.name: _args_value(c.arguments) for c in step.calls}),
            "observation": observation}


def usage_and_price(u: dict[str, Any]) -> tuple[Usage, dict[str, Any]]:
    usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0),
                  int(u.get("total_tokens") or 0))
    keys = ("prompt_unit_price", "prompt_price_unit", "prompt_price", "completion_unit_price", "completion_price_unit",
            "completion_price", "total_price")
    price: dict[str, Any] = {k: str(u[k]) for k in keys if k in u}
    price["currency"] = u.get("currency") or "USD"
    return usage, price


def _file_name(mime: str) -> str:
    """A name for an upload: Dify takes the file's extension from it (and refuses some)."""
    ext = mime.split("/", 1)[-1].split("+", 1)[0].lower()
    return f"image.{ext if ext.isalnum() and len(ext) <= 5 else 'png'}"


class DifyEngine(Engine):
    kind = "dify"
    supported_params: frozenset[str] = frozenset()  # a Dify app's model settings live in the app
    stateful = True

    def __init__(self, config: Any, http: httpx.AsyncClient | None = None, poster: Poster | None = None) -> None:
        super().__init__(config, http, poster)
        self.base = config.base_url
        self.headers = {"Authorization": f"Bearer {config.api_key}"}
        self._uploads: dict[tuple[str, str], str] = {}
        self._stream_only = False  # the app refused blocking mode once (an agent app): always stream

    # ---- errors --------------------------------------------------------------------------------

    def _map(self, status: int, body: Any, message: str, *, sent_remote: bool) -> UpstreamError | None:
        code = body.get("code") if isinstance(body, dict) else None
        if status == 404 and sent_remote and "Conversation Not Exists" in message:
            return RemoteConversationLost(message)
        if status == 404:
            return UpstreamNotFoundError(message)
        if status == 429:  # the same code every engine's rate limit has (the shared mapping below)
            return None
        if status == 413:
            return UpstreamError(message, code=FileTooLargeError.code, status=FileTooLargeError.status)
        if status == 415:
            return UpstreamError(message, code=UnsupportedFileTypeError.code, status=UnsupportedFileTypeError.status)
        if status in (401, 403):
            return ProviderAuthError(f"Dify rejected Threadline's app key: {message}")
        if 400 <= status < 500:
            return UpstreamError(message, code=code or "invalid_param", status=400)
        return None

    def _error_for(self, r: httpx.Response) -> UpstreamError:
        """Map a failed non-streaming Dify call; statuses Dify-specific mapping leaves alone use the shared one."""
        try:
            body = r.json()
        except ValueError:
            body = None
        message = redact(retry.error_message(body, r.text), self.config.api_key)
        return self._map(r.status_code, body, message, sent_remote=False) or upstream_error_from_status(
            r.status_code, message)

    # ---- files ---------------------------------------------------------------------------------

    async def _upload(self, data: bytes, name: str, mime: str, user: str) -> str:
        r = await self.http.post(f"{self.base}/files/upload", headers=self.headers,
                                 files={"file": (name, data, mime)}, data={"user": user})
        if r.status_code >= 400:
            raise self._error_for(r)
        return str(r.json()["id"])

    async def _uploaded(self, key: str, user: str, data: bytes, name: str, mime: str) -> str:
        fid = self._uploads.get((key, user))
        if fid is None:
            fid = await self._upload(data, name, mime, user)
            if len(self._uploads) >= MAX_CACHED_UPLOADS:
                self._uploads.pop(next(iter(self._uploads)))
            self._uploads[(key, user)] = fid
        return fid

    async def _files(self, req: EngineRequest) -> list[dict[str, Any]]:
        """Images as Dify files. Dify fetches every `remote_url` itself and cannot fetch a `data:` URL
        (400 "Reached maximum retries (3) for URL data:..."), so uploaded images and `data:` URLs go
        to the app's /files/upload as the turn's remote user and are sent as `local_file`."""
        out: list[dict[str, Any]] = []
        for img in req.images:
            if img.data is not None:
                key = f"file:{img.file_id}" if img.file_id else "sha256:" + hashlib.sha256(img.data).hexdigest()
                mime = img.mime_type or "image/png"
                fid = await self._uploaded(key, req.remote_user, img.data, img.name or _file_name(mime), mime)
            elif img.url and img.url.startswith("data:"):
                mime, payload = split_data_uri(img.url)
                key = "sha256:" + hashlib.sha256(img.url.encode()).hexdigest()
                cached = self._uploads.get((key, req.remote_user))
                if cached is None:  # decoded only to upload: a replay sends the id it got
                    try:
                        raw = base64.b64decode(payload, validate=True)
                    except (binascii.Error, ValueError):
                        raise InvalidParamError("image data URI is not valid base64") from None
                    cached = await self._uploaded(key, req.remote_user, raw, _file_name(mime), mime)
                fid = cached
            elif img.url:
                out.append({"type": "image", "transfer_method": "remote_url", "url": img.url})
                continue
            else:
                continue
            out.append({"type": "image", "transfer_method": "local_file", "upload_file_id": fid})
        return out

    def build_body(self, req: EngineRequest, files: list[dict[str, Any]], *, stream: bool | None = None) -> dict[str, Any]:
        stream = req.stream if stream is None else stream
        body: dict[str, Any] = {
            "inputs": req.inputs, "query": req.query, "response_mode": "streaming" if stream else "blocking",
            "conversation_id": req.remote_conversation_id or "", "user": req.remote_user,
            "auto_generate_name": req.auto_generate_name,
        }
        if files:
            body["files"] = files
        if req.workflow_id:
            body["workflow_id"] = req.workflow_id
        assert set(body) <= DIFY_FIELDS
        return body

    # ---- turns ---------------------------------------------------------------------------------

    async def events(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        files = await self._files(req)
        sent_remote = bool(req.remote_conversation_id)
        stream = req.stream or self._stream_only
        try:
            resp = await self._send(req, files, stream, sent_remote)
        except UpstreamError as exc:
            if stream or exc.status != 400 or NO_BLOCKING not in exc.message:
                raise
            self._stream_only = stream = True
            resp = await self._send(req, files, stream, sent_remote)
        naming: asyncio.Task[None] | None = None
        try:
            yield UpstreamAccepted()
            if not stream:
                try:
                    data = orjson.loads(await resp.aread())
                except orjson.JSONDecodeError:
                    raise UpstreamBadResponse("Dify sent a response that is not JSON.") from None
                if not isinstance(data, dict):
                    raise UpstreamBadResponse("Dify sent a response that is not a JSON object.")
                yield RemoteState(data.get("conversation_id"), data.get("message_id") or data.get("id"),
                                  data.get("task_id"))
                naming = self._start_naming(req, data.get("conversation_id"))
                if data.get("answer"):
                    yield TextDelta(data["answer"])
                usage = (data.get("metadata") or {}).get("usage")
                if usage:
                    u, p = usage_and_price(usage)
                    yield UsageReport(u, p)
            else:
                async for ev in self._stream(resp, req, sent_remote):
                    if isinstance(ev, RemoteState) and naming is None:
                        naming = self._start_naming(req, ev.conversation_id)
                    yield ev
            if naming is not None:
                await naming
            yield Finished("stop")
        finally:
            if naming is not None and not naming.done():
                naming.cancel()
            await resp.aclose()

    def _start_naming(self, req: EngineRequest, conversation_id: Any) -> asyncio.Task[None] | None:
        """A new remote conversation Threadline names (a seeded one) is renamed alongside the answer,
        so the first words are not held back by the extra call."""
        if req.remote_conversation_id or not req.conversation_name or not isinstance(conversation_id, str) \
                or not conversation_id:
            return None
        return asyncio.ensure_future(self.rename(conversation_id, req.conversation_name, req.remote_user))

    async def rename(self, conversation_id: str, name: str, remote_user: str) -> None:
        """POST /conversations/{id}/name (recording 054). A failure is logged, never the turn's: the
        answer is Dify's and stands whatever the conversation is called."""
        try:
            r = await self.http.post(f"{self.base}/conversations/{conversation_id}/name", headers=self.headers,
                                     json={"name": name, "auto_generate": False, "user": remote_user}, timeout=10.0)
        except httpx.HTTPError as exc:
            log.warning("engine %s: naming Dify's conversation failed (%s)", self.name, type(exc).__name__)
            return
        if r.status_code >= 400:
            log.warning("engine %s: naming Dify's conversation failed (HTTP %s)", self.name, r.status_code)

    async def _send(self, req: EngineRequest, files: list[dict[str, Any]], stream: bool,
                    sent_remote: bool) -> UpstreamResponse:
        payload = orjson.dumps(self.build_body(req, files, stream=stream))
        headers = {**self.headers, "Content-Type": "application/json"}
        return await retry.send(
            lambda: self.poster.post(f"{self.base}/chat-messages", payload, headers, read_timeout=self.config.timeout),
            max_retries=self.config.max_retries, secrets=(self.config.api_key,), engine=self.name,
            map_error=lambda s, b, m: self._map(s, b, m, sent_remote=sent_remote),
        )

    async def _stream(self, resp: UpstreamResponse, req: EngineRequest, sent_remote: bool) -> AsyncIterator[EngineEvent]:
        it = iter_sse(resp).__aiter__()
        bound = False
        got_data = False
        ended = False  # message_end or workflow_finished: Dify's stream has no other terminator
        while True:
            try:
                if not got_data and sent_remote:
                    sse = await asyncio.wait_for(it.__anext__(), FIRST_EVENT_TIMEOUT)
                else:
                    sse = await it.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                if await self._remote_missing(req):
                    raise RemoteConversationLost("Conversation Not Exists.") from None
                sent_remote = False  # it exists and is just slow: wait without a deadline
                continue
            if sse.event == "ping" or not sse.data:
                continue
            try:
                data = orjson.loads(sse.data)
            except orjson.JSONDecodeError:
                raise UpstreamBadResponse("Dify sent a stream event that is not JSON.") from None
            if not isinstance(data, dict):
                raise UpstreamBadResponse("Dify sent a stream event that is not a JSON object.")
            got_data = True
            kind = data.get("event")
            if not bound and data.get("conversation_id"):
                bound = True
                yield RemoteState(data.get("conversation_id"), data.get("message_id"), data.get("task_id"))
            if kind in ("message", "agent_message"):  # agent apps send agent_message instead
                if data.get("answer"):
                    yield TextDelta(data["answer"])
            elif kind == "agent_thought":
                created = data.get("created_at")
                yield step_from_thought(data, created if isinstance(created, int) else 0)
            elif kind == "message_replace":
                yield AnswerReplaced(data.get("answer") or "", data.get("reason"))
            elif kind == "message_end":
                ended = True
                usage = (data.get("metadata") or {}).get("usage")
                if usage:
                    u, p = usage_and_price(usage)
                    yield UsageReport(u, p)
            elif kind == "error":
                status = data.get("status")
                status = status if isinstance(status, int) and 400 <= status < 600 else 400
                message = redact(str(data.get("message") or "Dify error"), self.config.api_key)
                err = self._map(status, data, message, sent_remote=False)
                raise err or UpstreamError(message, code=str(data.get("code") or "internal_server_error"), status=502)
            elif kind == "workflow_finished":
                ended = True
                wf = data.get("data") or {}
                if isinstance(wf, dict) and wf.get("status") == "failed":
                    error = redact(str(wf.get("error") or "workflow failed"), self.config.api_key)
                    raise WorkflowFailedError(f"Run failed: {error}")
            # workflow/node/iteration/loop/message_file/tts events and future ones: ignored safely
        if not ended:
            raise UpstreamTruncated("Dify's stream ended before the answer did (no message_end).")

    async def _remote_missing(self, req: EngineRequest) -> bool:
        r = await self.http.get(f"{self.base}/messages", headers=self.headers,
                                params={"conversation_id": req.remote_conversation_id, "user": req.remote_user,
                                        "limit": 1})
        return r.status_code == 404

    async def suggested(self, message_id: str, remote_user: str) -> list[str]:
        """Dify's own GET /messages/{id}/suggested for one of its messages; its refusal (recording
        121: 400 "Suggested Questions Is Disabled.") is raised as Dify's error."""
        try:
            r = await self.http.get(f"{self.base}/messages/{message_id}/suggested", headers=self.headers,
                                    params={"user": remote_user}, timeout=self.config.timeout)
        except httpx.TimeoutException as exc:
            raise retry.transport_error(self.name, exc) from None
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(f"Engine {self.name!r} could not be reached ({type(exc).__name__}).") from None
        if r.status_code >= 400:
            raise self._error_for(r)
        try:
            body = r.json()
        except ValueError:
            raise UpstreamBadResponse(f"Engine {self.name!r} answered suggested questions with no JSON.") from None
        data = body.get("data") if isinstance(body, dict) else None
        return [q for q in data if isinstance(q, str)] if isinstance(data, list) else []

    async def stop(self, *, task_id: str, remote_user: str) -> None:
        await self.http.post(f"{self.base}/chat-messages/{task_id}/stop", headers=self.headers,
                             json={"user": remote_user}, timeout=10.0)

    async def list_messages(self, conversation_id: str, user: str) -> list[dict[str, Any]]:
        """All of a remote conversation's messages, oldest first, following first_id / has_more.

        Dify gives no sequence: its created_at has whole seconds, messages of one second come in
        no guaranteed order within a page, and parent ids are nil for the service API. So the order
        is created_at, then the pages (the newest comes first and each first_id page holds messages
        created before the page after it), then, within one second on one page, the reverse of the
        order Dify returned: Dify sorts newest first and flips the page, so an equal-second run comes
        newest first (recording 047 lists q2 before q1; a live import showed `hello, third, again`
        for `hello, again, third`). A heuristic: Dify guarantees no order within a second."""
        pages: list[list[dict[str, Any]]] = []  # newest page first
        first_id: str | None = None
        while True:
            params: dict[str, Any] = {"conversation_id": conversation_id, "user": user, "limit": 100}
            if first_id:
                params["first_id"] = first_id
            r = await self.http.get(f"{self.base}/messages", headers=self.headers, params=params)
            if r.status_code >= 400:
                raise self._error_for(r)
            page = r.json()
            data = [m for m in page.get("data") or [] if isinstance(m, dict)]
            pages.append(data)
            if not page.get("has_more") or not data:
                break
            # The page's oldest message (the API pages by the id of "the oldest message shown").
            first_id = min(enumerate(data), key=lambda im: (_created(im[1]), im[0]))[1]["id"]
        n = len(pages)
        ranked = [((_created(m), n - p, -i), m) for p, data in enumerate(pages) for i, m in enumerate(data)]
        return [m for _, m in sorted(ranked, key=lambda km: km[0])]


def _created(message: dict[str, Any]) -> float:
    v = message.get("created_at")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
