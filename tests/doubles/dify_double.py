"""A Dify service-API double built from the recorded exchanges in ../shared/fixtures/dify/: the
echo chatflow (answer echoes the query, a turn counter and the previous query live in conversation
variables), per-user conversation scoping, uploads, /messages paging, stop, and Dify's error bodies.
Streams look like the recordings: `event: ping` first, compact `data:` frames, no [DONE].

Faults (`fault`, one of FAULTS; the shared ones behave as in the OpenAI double):
- `429`: Dify's per-app concurrency refusal, `{"code": "too_many_requests", ...}` with no Retry-After
  (libs/external_api.py `handle_quota_exceeded` sets none).
- `500`: the service API's `raise InternalServerError()`: code `internal_server_error`, Werkzeug's text.
- `timeout`, `reset`, `cut`, `malformed`: as the OpenAI double; `cut` ends a stream after `fault_after`
  message events with neither `message_end` nor `workflow_finished`.
- `error_event`: streaming: after `fault_after` message events the run fails the way `error_kind`
  says: `"workflow"` a failed `workflow_finished` as recorded in 075 (the node's error in
  `data.error`), `"error"` Dify's `error` event (`code`, `status`, `message`); then the stream ends.
  Blocking: 400 `invalid_param` "Run failed: ..." as recorded in 076.
`error_message` replaces the failure text (a workflow that echoes secrets). `replace_with` is output
moderation: a streamed answer is followed by `message_replace` with that text (reason
`output_moderation`), a blocking one is that text.

Like real Dify 1.13 (seen live): a `remote_url` file whose URL is a `data:` URL is refused with 400
`invalid_param` "Reached maximum retries (3) for URL data:..." (Dify fetches every remote URL, and
cannot fetch that one). A new conversation is named from its first query when `auto_generate_name`
is true (the recorded names are the query; live, a long seeded query became its first 47 characters
and "..."), "New conversation" otherwise; `POST /conversations/{id}/name` renames it as recorded in
054-056 and `renames` keeps each rename's body.

Streams run as Dify runs them: the workflow goes on in the background when the client hangs up,
and the message in `/messages` grows as the answer is produced: the whole answer in the end,
unless `/chat-messages/{task_id}/stop` was called, which ends the run (`workflow_finished` with
status `stopped`, no `message_end`, as recorded in 070) and keeps what was produced (074).
`wait_idle()` blocks until no stream is running (a test's way to know Dify has finished).

`agent=True` plays an agent-chat app instead (no recording exists; built from Dify 1.13's own
agent runner, fc_agent_runner.py, and task_entities.py): blocking mode is refused with 400
`invalid_param` "Agent Chat App does not support blocking mode" before anything is created; a
stream runs one tool, `get_weather`, then answers. Each thought is sent whole every time it
changes (created empty, then with its tool and input, then with the observation), `tool_input`
and `observation` JSON keyed by tool name as Dify writes them, the answer as `agent_message`
events, and `message_end` ends the stream (no workflow events). `/messages` lists the thoughts.
`agent_observation` replaces what the tool returns."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .openai_double import blocking_fault

USAGE = {"prompt_tokens": 0, "prompt_unit_price": "0.0", "prompt_price_unit": "0.0", "prompt_price": "0.0",
         "completion_tokens": 0, "completion_unit_price": "0.0", "completion_price_unit": "0.0",
         "completion_price": "0.0", "total_tokens": 0, "total_price": "0.0", "currency": "USD", "latency": 0.0}


NODE_ERROR = "Reached maximum retries for URL http://127.0.0.1:9/unreachable"  # fixture 075/076
WERKZEUG_500 = ("The server encountered an internal error and was unable to complete your request. Either the "
                "server is overloaded or there is an error in the application.")


def err(status: int, code: str, message: str) -> Response:
    return Response(orjson.dumps({"code": code, "message": message, "status": status}) + b"\n", status_code=status,
                    media_type="application/json")


@dataclass
class DifyDouble:
    api_key: str = "app-dify-double-key"
    slow: float = 0.0
    page_cap: int = 100
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    stops: list[dict[str, Any]] = field(default_factory=list)
    renames: list[dict[str, Any]] = field(default_factory=list)
    stopped_tasks: set[str] = field(default_factory=set)
    message_pages: int = 0
    fault: str | None = None  # one of FAULTS
    fault_after: int = 2  # message events a stream sends before its fault
    stall: float = 5.0  # how long `timeout` stays silent
    error_kind: str = "workflow"  # how `error_event` fails a stream: "workflow" | "error"
    error_message: str | None = None  # the failure text for `error_event`
    replace_with: str | None = None  # output moderation's replacement answer
    agent: bool = False  # play an agent-chat app (see the module doc)
    agent_observation: str | None = None  # what the agent's tool returns
    # How /messages pages: "dify" (default) plays the real server
    # (message_service.pagination_by_first_id): rows by created_at (whole seconds) descending,
    # first_id returns messages created strictly before it, each page reversed to ascending; and
    # messages of the same second come in an order Dify does not guarantee -- here each
    # equal-second run within a page comes newest first, as recording 047 saw (q2 before q1).
    # "send" pages by send order (a server that kept order within a second).
    paging: str = "dify"
    # GET /messages/{id}/suggested: the app's suggestions (None: the feature is off, recording 121)
    suggestions: list[str] | None = None
    suggest_calls: list[dict[str, Any]] = field(default_factory=list)
    clock: int | None = None  # when set, the created_at (unix seconds) of new messages
    active: int = 0  # streams still running (on the double's own loop, even after their client left)
    idle: threading.Condition = field(default_factory=threading.Condition)
    pumps: set[asyncio.Task[None]] = field(default_factory=set)

    def reset(self, **kw: Any) -> DifyDouble:
        fresh = DifyDouble()
        for k in fresh.__dataclass_fields__:
            if k in ("idle", "pumps"):
                continue
            setattr(self, k, getattr(fresh, k))
        for k, v in kw.items():
            setattr(self, k, v)
        return self

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block (in the test's thread) until every stream's run has ended; False if one still runs."""
        with self.idle:
            return self.idle.wait_for(lambda: self.active == 0, timeout)

    def _run_ended(self) -> None:
        with self.idle:
            self.active -= 1
            self.idle.notify_all()

    def _detached(self, gen: Any) -> Any:
        """Run `gen` to its end on the double's loop whatever the client does; the response reads its frames."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()
        with self.idle:
            self.active += 1

        async def pump() -> None:
            try:
                async for chunk in gen:
                    queue.put_nowait(chunk)
                queue.put_nowait(done)
            except BaseException as exc:  # a fault (reset): the client sees the connection break
                queue.put_nowait(exc)
            finally:
                self._run_ended()

        task = asyncio.get_running_loop().create_task(pump())
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)

        async def relay():  # type: ignore[no-untyped-def]
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        return relay()

    def conversations_by_query(self, query: str) -> str | None:
        for cid, c in self.conversations.items():
            if any(m["query"] == query for m in c["messages"]):
                return cid
        return None

    def seed_conversation(self, user: str, queries: list[str], created_at: list[int] | None = None) -> str:
        cid = str(uuid.uuid4())
        self.conversations[cid] = {"user": user, "turns": 0, "last_query": "", "messages": []}
        for i, q in enumerate(queries):
            self._answer(cid, q, {})
            if created_at is not None:
                self.conversations[cid]["messages"][-1]["created_at"] = created_at[i]
        return cid

    def _answer(self, cid: str, query: str, inputs: dict[str, Any]) -> tuple[str, str]:
        c = self.conversations[cid]
        answer = (f"echo: {query}\nturn: {c['turns']}\nprevious: {c['last_query']}\n"
                  f"nickname: {inputs.get('nickname') or ''}\n")
        mid = str(uuid.uuid4())
        c["messages"].append({"id": mid, "query": query, "answer": answer, "inputs": inputs,
                              "created_at": self.clock if self.clock is not None else int(time.time())})
        c["turns"] += 1
        c["last_query"] = query
        return mid, answer

    def _auth(self, request: Request) -> Response | None:
        h = request.headers.get("authorization", "")
        if not h.startswith("Bearer "):
            return err(401, "unauthorized", "Authorization header must be provided and start with 'Bearer'")
        if h[7:] != self.api_key:
            return err(401, "unauthorized", "Access token is invalid")
        return None

    async def chat(self, request: Request) -> Response:
        if (bad := self._auth(request)) is not None:
            return bad
        body = orjson.loads(await request.body())
        self.requests.append(body)
        user = body.get("user")
        if not user:
            return err(400, "invalid_param", "Arg user must be provided.")
        if not body.get("query"):
            return err(400, "invalid_param", "query is required")
        if self.fault == "429":
            return err(429, "too_many_requests",
                       "Too many requests. Please try again later. The current maximum concurrent requests allowed is 1.")
        if self.fault == "500":
            return err(500, "internal_server_error", WERKZEUG_500)
        for f in body.get("files") or []:
            if f["transfer_method"] == "remote_url" and str(f.get("url") or "").startswith("data:"):
                return err(400, "invalid_param", f"Reached maximum retries (3) for URL {f['url']}")
            if f["transfer_method"] == "local_file":
                up = self.uploads.get(f.get("upload_file_id") or "")
                if up is None or up["user"] != user:
                    return err(400, "invalid_param", "Invalid upload file id")
        cid = body.get("conversation_id") or ""
        streaming = body.get("response_mode") == "streaming"
        if self.agent and not streaming:
            return err(400, "invalid_param", "Agent Chat App does not support blocking mode")
        if cid:
            c = self.conversations.get(cid)
            if c is None or c["user"] != user:
                if streaming:  # fixture 082: ping, then silence
                    async def silence():  # type: ignore[no-untyped-def]
                        yield b"event: ping\n\n"
                        await asyncio.sleep(60)
                    return StreamingResponse(silence(), media_type="text/event-stream")
                return err(404, "not_found", "Conversation Not Exists.")
        else:
            cid = str(uuid.uuid4())
            query = str(body["query"])
            name = (query if len(query) <= 50 else query[:47] + "...") if body.get("auto_generate_name", True) \
                else "New conversation"
            self.conversations[cid] = {"user": user, "turns": 0, "last_query": "", "messages": [], "name": name}
        if self.agent:
            return StreamingResponse(self._agent_stream(cid, body["query"], body.get("inputs") or {}),
                                     media_type="text/event-stream; charset=utf-8")
        mid, answer = self._answer(cid, body["query"], body.get("inputs") or {})
        record = self.conversations[cid]["messages"][-1]
        if streaming:
            record["answer"] = ""  # grows as the run produces it (see the module doc)
        final = answer if self.replace_with is None else self.replace_with
        task_id = str(uuid.uuid4())
        created = int(time.time())
        failure = self.error_message or NODE_ERROR
        if not streaming:
            if self.fault == "error_event":
                return err(400, "invalid_param", f"Run failed: {failure}")
            whole = orjson.dumps({"event": "message", "task_id": task_id, "id": mid, "message_id": mid,
                                  "conversation_id": cid, "mode": "advanced-chat", "answer": final,
                                  "metadata": {"annotation_reply": None, "retriever_resources": [],
                                               "usage": USAGE}, "created_at": created})
            return (await blocking_fault(self.fault, self.stall, whole)
                    or Response(whole, media_type="application/json; charset=utf-8"))
        env = {"conversation_id": cid, "message_id": mid, "created_at": created}

        async def gen():  # type: ignore[no-untyped-def]
            def frame(d: dict[str, Any]) -> bytes:
                return b"data: " + orjson.dumps(d) + b"\n\n"

            yield b"event: ping\n\n"
            run = str(uuid.uuid4())
            yield frame({"event": "workflow_started", **env, "task_id": task_id, "workflow_run_id": run,
                         "data": {"id": run, "workflow_id": "w", "inputs": {}, "created_at": created}})
            pieces = [p + "\n" for p in answer.split("\n") if p] + [""] * 8
            for i, p in enumerate(pieces):
                if self.slow:
                    await asyncio.sleep(self.slow)
                if self.fault and i == self.fault_after:
                    if self.fault == "timeout":
                        await asyncio.sleep(self.stall)
                    elif self.fault == "reset":
                        raise ConnectionResetError("double: upstream killed mid-stream")
                    elif self.fault == "cut":
                        return
                    elif self.fault == "malformed":
                        yield frame({"event": "message", **env, "task_id": task_id, "id": mid, "answer": p})[:50] + b"\n\n"
                        continue
                    elif self.fault == "error_event" and self.error_kind == "error":
                        yield frame({"event": "error", **env, "code": "completion_request_error", "status": 400,
                                     "message": failure})
                        return
                    elif self.fault == "error_event":
                        yield frame({"event": "workflow_finished", **env, "task_id": task_id, "workflow_run_id": run,
                                     "data": {"id": run, "workflow_id": "w", "status": "failed",
                                              "outputs": {"answer": "".join(pieces[:i]), "files": []},
                                              "error": failure, "elapsed_time": 0.01, "total_tokens": 0,
                                              "total_steps": 3, "created_by": {"id": "eu", "user": user},
                                              "created_at": created, "finished_at": created,
                                              "exceptions_count": 1, "files": []}})
                        return
                if task_id in self.stopped_tasks:  # fixture 070: no message_end; 074: the partial is kept
                    yield frame({"event": "workflow_finished", **env, "task_id": task_id, "workflow_run_id": run,
                                 "data": {"id": run, "workflow_id": "w", "status": "stopped",
                                          "outputs": {"answer": record["answer"], "files": []},
                                          "error": "Stopped by user.", "elapsed_time": 0.01, "total_tokens": 0,
                                          "total_steps": 3, "created_by": {"id": "eu", "user": user},
                                          "created_at": created, "finished_at": created, "exceptions_count": 0,
                                          "files": []}})
                    return
                record["answer"] += p
                yield frame({"event": "message", **env, "task_id": task_id, "id": mid, "answer": p,
                             "from_variable_selector": ["answer", "answer"]})
            if self.replace_with is not None:
                record["answer"] = self.replace_with
                yield frame({"event": "message_replace", **env, "task_id": task_id, "answer": self.replace_with,
                             "reason": "output_moderation"})
            yield frame({"event": "message_end", **env, "task_id": task_id, "id": mid,
                         "metadata": {"annotation_reply": None, "retriever_resources": [], "usage": USAGE},
                         "files": []})
            yield frame({"event": "workflow_finished", **env, "task_id": task_id, "workflow_run_id": run,
                         "data": {"id": run, "status": "succeeded", "outputs": {"answer": final}, "error": None}})

        return StreamingResponse(self._detached(gen()), media_type="text/event-stream; charset=utf-8")

    async def _agent_stream(self, cid: str, query: str, inputs: dict[str, Any]):  # type: ignore[no-untyped-def]
        c = self.conversations[cid]
        mid, task_id, created = str(uuid.uuid4()), str(uuid.uuid4()), int(time.time())
        city = query.split()[-1].strip("?.!") or "Paris"
        observation = self.agent_observation or f"Sunny, 21°C in {city}"
        answer = f"It is sunny in {city}: {observation}."
        env = {"conversation_id": cid, "message_id": mid, "created_at": created}
        labels = {"get_weather": {"en_US": "Get weather", "zh_Hans": "Get weather"}}
        t1 = {"id": str(uuid.uuid4()), "position": 1, "thought": "", "observation": "", "tool": "",
              "tool_labels": {}, "tool_input": "", "message_files": []}
        t2 = {**t1, "id": str(uuid.uuid4()), "position": 2}

        def thought(t: dict[str, Any]) -> bytes:
            return b"data: " + orjson.dumps({"event": "agent_thought", **env, "task_id": task_id, **t}) + b"\n\n"

        yield b"event: ping\n\n"
        yield thought(t1)
        t1.update(tool="get_weather", tool_labels=labels,
                  tool_input=json.dumps({"get_weather": {"city": city}}, ensure_ascii=False))
        yield thought(t1)
        t1.update(observation=json.dumps({"get_weather": observation}, ensure_ascii=False))
        yield thought(t1)
        yield thought(t2)
        for piece in (answer[: len(answer) // 2], answer[len(answer) // 2:]):
            if self.slow:
                await asyncio.sleep(self.slow)
            yield b"data: " + orjson.dumps({"event": "agent_message", **env, "task_id": task_id, "id": mid,
                                            "answer": piece}) + b"\n\n"
        t2.update(thought=answer)
        yield thought(t2)
        c["messages"].append({"id": mid, "query": query, "answer": answer, "inputs": inputs, "created_at": created,
                              "thoughts": [{**t, "created_at": created} for t in (t1, t2)]})
        c["turns"] += 1
        c["last_query"] = query
        yield b"data: " + orjson.dumps({"event": "message_end", **env, "task_id": task_id, "id": mid,
                                        "metadata": {"retriever_resources": [], "usage": USAGE},
                                        "files": None}) + b"\n\n"

    async def stop(self, request: Request) -> Response:
        if (bad := self._auth(request)) is not None:
            return bad
        body = orjson.loads(await request.body())
        self.stops.append(body)
        self.stopped_tasks.add(request.path_params["task_id"])
        return JSONResponse({"result": "success"})

    async def rename(self, request: Request) -> Response:
        if (bad := self._auth(request)) is not None:
            return bad
        body = orjson.loads(await request.body())
        self.renames.append(body)
        c = self.conversations.get(request.path_params["cid"])
        if c is None or c["user"] != body.get("user"):
            return err(404, "not_found", "Conversation Not Exists.")
        if body.get("auto_generate"):
            first = c["messages"][0]["query"] if c["messages"] else ""
            if first:
                c["name"] = first if len(first) <= 50 else first[:47] + "..."
        elif not str(body.get("name") or "").strip():
            return err(400, "invalid_param", "name is required when auto_generate is false")
        else:
            c["name"] = body["name"]
        return JSONResponse({"id": request.path_params["cid"], "name": c.get("name", ""), "inputs": {},
                             "status": "normal", "introduction": "", "created_at": int(time.time()),
                             "updated_at": int(time.time())})

    async def upload(self, request: Request) -> Response:
        if (bad := self._auth(request)) is not None:
            return bad
        form = await request.form()
        f = form.get("file")
        if f is None or not hasattr(f, "filename"):
            return err(400, "no_file_uploaded", "Please upload your file.")
        data = await f.read()
        fid = str(uuid.uuid4())
        self.uploads[fid] = {"user": form.get("user"), "name": f.filename, "size": len(data),
                             "mime_type": f.content_type, "data": data}
        return JSONResponse({"id": fid, "name": f.filename, "size": len(data), "extension": "png",
                             "mime_type": f.content_type, "created_by": "x", "created_at": int(time.time()),
                             "preview_url": None, "source_url": "", "original_url": None, "user_id": None,
                             "tenant_id": "t", "conversation_id": None, "file_key": None}, status_code=201)

    async def messages(self, request: Request) -> Response:
        if (bad := self._auth(request)) is not None:
            return bad
        self.message_pages += 1
        q = request.query_params
        c = self.conversations.get(q.get("conversation_id", ""))
        if c is None or c["user"] != q.get("user"):
            return err(404, "not_found", "Conversation Not Exists.")
        limit = min(int(q.get("limit") or 20), self.page_cap)
        msgs = c["messages"]
        if self.paging == "dify":
            page, more = self._dify_page(msgs, q.get("first_id"), limit)
            if page is None:
                return err(404, "not_found", "First Message Not Exists.")
        else:
            if q.get("first_id"):
                idx = next(i for i, m in enumerate(msgs) if m["id"] == q["first_id"])
                msgs = msgs[:idx]
            page, more = msgs[-limit:], len(msgs) > limit
        data = [{"id": m["id"], "conversation_id": q["conversation_id"], "parent_message_id": None,
                 "inputs": m["inputs"], "query": m["query"], "answer": m["answer"], "feedback": None,
                 "retriever_resources": [], "created_at": m["created_at"],
                 "agent_thoughts": [{"id": t["id"], "chain_id": None, "message_id": m["id"], "position": t["position"],
                                     "thought": t["thought"], "tool": t["tool"], "tool_labels": t["tool_labels"],
                                     "tool_input": t["tool_input"], "created_at": t["created_at"],
                                     "observation": t["observation"], "files": []} for t in m.get("thoughts", ())],
                 "message_files": [], "status": "normal", "error": None} for m in page]
        return JSONResponse({"limit": limit, "has_more": more, "data": data})

    async def suggested(self, request: Request) -> Response:
        """As Dify 1.13 (message_service.get_suggested_questions_after_answer): `user` required, the
        message must be the user's (404), then the feature must be on (recording 121's 400)."""
        if (bad := self._auth(request)) is not None:
            return bad
        user, mid = request.query_params.get("user"), request.path_params["mid"]
        self.suggest_calls.append({"message_id": mid, "user": user})
        if not user:
            return err(400, "invalid_param", "Arg user must be provided.")
        if not any(c["user"] == user and any(m["id"] == mid for m in c["messages"]) for c in self.conversations.values()):
            return err(404, "not_found", "Message Not Exists.")
        if self.suggestions is None:
            return err(400, "bad_request", "Suggested Questions Is Disabled.")
        return JSONResponse({"result": "success", "data": self.suggestions})

    @staticmethod
    def _dify_page(msgs: list[dict[str, Any]], first_id: str | None,
                   limit: int) -> tuple[list[dict[str, Any]] | None, bool]:
        """One page as Dify's pagination_by_first_id builds it (see `paging`)."""
        if first_id:
            first = next((m for m in msgs if m["id"] == first_id), None)
            if first is None:
                return None, False
            msgs = [m for m in msgs if m["created_at"] < first["created_at"] and m["id"] != first_id]
        # ORDER BY created_at DESC LIMIT n+1; ties come in send order (as Postgres gave them), so the
        # reversal to ascending leaves each equal-second run newest first.
        rows = sorted(msgs, key=lambda m: -m["created_at"])[:limit + 1]
        return list(reversed(rows[:limit])), len(rows) > limit

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat-messages", self.chat, methods=["POST"]),
            Route("/v1/chat-messages/{task_id}/stop", self.stop, methods=["POST"]),
            Route("/v1/files/upload", self.upload, methods=["POST"]),
            Route("/v1/conversations/{cid}/name", self.rename, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["GET"]),
            Route("/v1/messages/{mid}/suggested", self.suggested, methods=["GET"]),
        ])
