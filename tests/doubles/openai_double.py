"""A strict OpenAI-compatible chat-completions double, with the per-provider modes the real
services show (../shared/reference/providers.md, ../shared/fixtures/providers/):

- `openai`: unknown fields → 400 "Unrecognized request argument supplied: X"; usage chunk with
  `choices: []` when `stream_options.include_usage` is set.
- `nim`: unknown fields → 422 application/problem+json (extra_forbidden).
- `xai`: unknown fields → 400 {"code": "...", "error": "Argument not supported: X"}.
- `deepseek`: `reasoning_content` deltas, `: keep-alive` comments, usage on the finish chunk;
  400 if a request message carries `reasoning_content` (R1-era rule).
Answer shaping: `think_tags` (R1 <think> inside content, split across chunks), `think_no_open`
(opening tag missing), `reasoning_content`. Faults: `slow` (delay per chunk), `fail_after`
(connection dropped after N chunks), `rate_limit` (N× 429 with Retry-After first), and `fault`,
one of FAULTS, each what the real service (or the network in front of it) does:

- `429`: OpenAI's rate-limit body with `retry-after` (seconds) and `x-ratelimit-reset-requests`.
- `500`: OpenAI's server_error body.
- `timeout`: blocking: silent for `stall` seconds before answering; streaming: `fault_after` content
  chunks, then silent for `stall` seconds (then the rest).
- `reset`: the connection drops mid-body (blocking: half the JSON) or after `fault_after` chunks.
- `cut`: the body or stream ends cleanly but early: half the JSON body (with a matching
  Content-Length); a stream with no finish_reason and no `[DONE]` after `fault_after` chunks.
- `malformed`: blocking: a 200 HTML page where JSON belongs (a proxy or web UI behind the URL);
  streaming: after `fault_after` chunks a `data:` chunk whose JSON breaks off, then the rest as usual.
- `error_event`: streaming: after `fault_after` chunks the provider's in-stream error
  `data: {"error": {...}}` (what openai-python raises APIError on), then the stream ends; blocking:
  the provider's 400 error body for a request it could not serve (context_length_exceeded).
`error_message` replaces the provider's text in `error_event` (a provider that echoes secrets).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ALLOWED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "stop", "seed", "tools", "tool_choice", "n", "user", "response_format", "frequency_penalty",
           "presence_penalty", "logprobs", "parallel_tool_calls", "metadata", "store"}
NIM_ALLOWED = {"model", "messages", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed",
               "tools", "tool_choice"}
XAI_ALLOWED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "stop", "seed", "tools", "tool_choice", "n", "user", "response_format"}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
FAULTS = ("429", "500", "timeout", "reset", "cut", "malformed", "error_event")
# OpenAI's own texts for these failures.
SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
CONTEXT_TOO_LONG = ("This model's maximum context length is 128000 tokens. However, your messages resulted in "
                    "131072 tokens. Please reduce the length of the messages.")


def _example(schema: dict[str, Any]) -> Any:
    """A value that satisfies a (simple) JSON schema, as a model in structured-output mode writes."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        return {k: _example(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_example(schema.get("items") or {"type": "string"})]
    return {"string": "example", "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "example")


async def blocking_fault(fault: str | None, stall: float, whole: bytes,
                         media_type: str = "application/json") -> Response | None:
    """The blocking answer `whole` as `fault` delivers it (None: deliver it as it is). Shared by the
    doubles: a slow, dropped, cut short or mangled body looks the same whoever sends it."""
    if fault == "timeout":
        await asyncio.sleep(stall)
    elif fault == "reset":
        async def half():  # type: ignore[no-untyped-def]
            yield whole[:len(whole) // 2]
            raise ConnectionResetError("double: upstream killed mid-body")
        return StreamingResponse(half(), media_type=media_type)
    elif fault == "cut":
        return Response(whole[:len(whole) // 2], media_type=media_type)
    elif fault == "malformed":
        return Response(b"<html><head><title>Welcome</title></head><body><h1>It works!</h1></body></html>\n",
                        media_type="text/html")
    return None


@dataclass
class OpenAIDouble:
    provider: str = "openai"  # openai | nim | xai | deepseek
    answer_mode: str = "plain"  # plain | think_tags | think_no_open | reasoning_content
    reasoning: str = "Let me think about this carefully."
    reply: str | None = None  # fixed answer; default echoes the last user text
    chunk_size: int = 3
    slow: float = 0.0
    fail_after: int | None = None
    rate_limit: int = 0
    retry_after: str = "0.05"
    fault: str | None = None  # one of FAULTS
    fault_after: int = 2  # content chunks a stream sends before its fault
    stall: float = 5.0  # how long `timeout` stays silent
    error_message: str | None = None  # the provider's text for `error_event`
    parallel_calls: int = 1  # how many of the offered tools a tool-calling answer calls
    finish: str = "stop"  # the finish reason of a text answer ("length": cut at max_tokens)
    api_key: str | None = "sk-test-double-key"
    # The model's answer to a request, when a test plays the model itself (None: the usual answer).
    answer_hook: Callable[[dict[str, Any]], str | None] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def reset(self, **kw: Any) -> OpenAIDouble:
        fresh = OpenAIDouble()
        for k in fresh.__dataclass_fields__:
            setattr(self, k, getattr(fresh, k))
        for k, v in kw.items():
            setattr(self, k, v)
        return self

    # ---- validation, as the real services do it ---------------------------------------------------

    def _reject(self, body: dict[str, Any]) -> Response | None:
        allowed = {"nim": NIM_ALLOWED, "xai": XAI_ALLOWED}.get(self.provider, ALLOWED)
        for key in body:
            if key not in allowed:
                return self._unknown_field(key)
        if "model" not in body or "messages" not in body:
            return JSONResponse({"error": {"message": "you must provide a model parameter", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        if body.get("stream_options") is not None and not body.get("stream"):
            return JSONResponse({"error": {"message": "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                           "type": "invalid_request_error", "param": "stream_options", "code": None}},
                                status_code=400)
        for i, m in enumerate(body["messages"]):
            if self.provider == "deepseek" and "reasoning_content" in m and not m.get("tool_calls"):
                return JSONResponse({"error": {"message": "The reasoning_content is an intermediate result for display purposes only and will not be included in the context for inference. Please remove the reasoning_content from your input.",
                                               "type": "invalid_request_error", "param": None, "code": "invalid_request_error"}},
                                    status_code=400)
            extra = set(m) - MESSAGE_KEYS - ({"reasoning_content"} if self.provider == "deepseek" else set())
            if extra:
                return self._unknown_field(f"messages[{i}].{sorted(extra)[0]}")
            if m.get("role") not in ROLES:
                return JSONResponse({"error": {"message": f"Invalid value: '{m.get('role')}'. Supported values are: 'system', 'assistant', 'user', 'tool', and 'developer'.",
                                               "type": "invalid_request_error", "param": f"messages[{i}].role", "code": "invalid_value"}},
                                    status_code=400)
            content = m.get("content")
            if m.get("role") == "assistant" and m.get("tool_calls") and content is None:
                content = ""  # an assistant message that only calls tools has null content
            if isinstance(content, list):
                for p in content:
                    if p.get("type") not in ("text", "image_url") or (p["type"] == "image_url" and "url" not in p.get("image_url", {})):
                        return JSONResponse({"error": {"message": f"Invalid content part in messages[{i}]", "type": "invalid_request_error",
                                                       "param": f"messages[{i}].content", "code": None}}, status_code=400)
            elif not isinstance(content, str):
                return JSONResponse({"error": {"message": f"Invalid type for 'messages[{i}].content'", "type": "invalid_request_error",
                                               "param": f"messages[{i}].content", "code": "invalid_type"}}, status_code=400)
        return self._reject_tools(body)

    @staticmethod
    def _bad(message: str, param: str | None, code: str | None = None) -> Response:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": code}}, status_code=400)

    def _reject_tools(self, body: dict[str, Any]) -> Response | None:
        """OpenAI's rules for tools and tool messages (texts as the API gives them)."""
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not tools:
                return self._bad("Invalid 'tools': empty array. Expected an array with minimum length 1.", "tools",
                                 "empty_array")
            for i, t in enumerate(tools):
                fn = t.get("function") if isinstance(t, dict) else None
                if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                        or not isinstance(fn.get("name"), str) or set(fn) - {"name", "description", "parameters",
                                                                              "strict"}:
                    return self._bad(f"Invalid value for 'tools[{i}]'.", f"tools[{i}]", "invalid_value")
        choice = body.get("tool_choice")
        if choice is not None and not tools:
            return self._bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                             "specified.", "tool_choice")
        if "parallel_tool_calls" in body and not tools:
            return self._bad("Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when "
                             "'tools' are specified.", "parallel_tool_calls")
        pending: set[str] = set()
        for i, m in enumerate(body["messages"]):
            if m.get("role") == "tool":
                if m.get("tool_call_id") not in pending:
                    return self._bad("Invalid parameter: messages with role 'tool' must be a response to a "
                                     "preceeding message with 'tool_calls'.", f"messages.[{i}].role")
                pending.discard(m["tool_call_id"])
                continue
            if pending:
                return self._bad("An assistant message with 'tool_calls' must be followed by tool messages responding "
                                 "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                                 + ", ".join(sorted(pending)), f"messages.[{i}].role")
            if m.get("role") == "assistant" and m.get("tool_calls"):
                pending = {c["id"] for c in m["tool_calls"]}
                if self.provider == "deepseek" and "reasoning_content" not in m:
                    return self._bad("Missing `reasoning_content` field in the assistant message at message index "
                                     f"{i}. For more information, please refer to https://api-docs.deepseek.com/"
                                     "guides/thinking_mode#tool-calls", None, "invalid_request_error")
        if pending:
            return self._bad("An assistant message with 'tool_calls' must be followed by tool messages responding to "
                             "each 'tool_call_id'.", "messages")
        return None

    def _unknown_field(self, key: str) -> Response:
        if self.provider == "nim":
            return Response(orjson.dumps({
                "type": "urn:inference-service:problem-details:unprocessable-entity", "title": "Unprocessable Entity",
                "status": 422, "detail": f"body -> {key}\n  Extra inputs are not permitted (type=extra_forbidden)",
                "instance": "/v2/nvcf/pexec/functions/00000000-0000-0000-0000-000000000000",
                "requestId": str(uuid.uuid4())}), status_code=422, media_type="application/problem+json")
        if self.provider == "xai":
            return JSONResponse({"code": "Client specified an invalid argument", "error": f"Argument not supported: {key}"},
                                status_code=400)
        return JSONResponse({"error": {"message": f"Unrecognized request argument supplied: {key}",
                                       "type": "invalid_request_error", "param": None, "code": None}}, status_code=400)

    # ---- answers ---------------------------------------------------------------------------------

    def calls_for(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """With tools offered and a user turn last, the double calls a tool (as a model would): the
        named one of tool_choice, else the first (`calls` of them when parallel); a tool result
        last gets a text answer. tool_choice "none" never calls."""
        tools = body.get("tools") or []
        choice = body.get("tool_choice")
        last = body["messages"][-1]
        if not tools or choice == "none" or last.get("role") == "tool":
            return []
        if isinstance(choice, dict):
            names = [choice["function"]["name"]]
        else:
            names = [t["function"]["name"] for t in tools][: 1 if body.get("parallel_tool_calls") is False
                                                           else self.parallel_calls]
        text = last.get("content")
        if isinstance(text, list):
            text = " ".join(p.get("text", "") for p in text if p.get("type") == "text")
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": n, "arguments": orjson.dumps({"q": text}).decode()}} for n in names]

    def answer_for(self, body: dict[str, Any]) -> str:
        if self.answer_hook is not None:
            hooked = self.answer_hook(body)
            if hooked is not None:
                return hooked
        if self.reply is not None:
            return self.reply
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            return orjson.dumps(_example(rf["json_schema"].get("schema") or {})).decode()
        if rf.get("type") == "json_object":
            return '{"answer": "ok"}'
        last = body["messages"][-1]
        if last.get("role") == "tool":
            return f"Tool said: {last['content']}"
        last = last["content"]
        if isinstance(last, list):
            last = " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        return f"Answer to: {last}"

    def _content_stream(self, answer: str) -> list[tuple[str, str]]:
        """(field, piece) pairs in the order the provider would stream them."""
        n = self.chunk_size
        if self.answer_mode == "think_tags":
            full = f"<think>{self.reasoning}</think>\n\n{answer}"
            return [("content", full[i:i + n]) for i in range(0, len(full), n)]
        if self.answer_mode == "think_no_open":
            full = f"{self.reasoning}</think>\n\n{answer}"
            return [("content", full[i:i + n]) for i in range(0, len(full), n)]
        out: list[tuple[str, str]] = []
        if self.answer_mode == "reasoning_content":
            out += [("reasoning_content", self.reasoning[i:i + n]) for i in range(0, len(self.reasoning), n)]
        out += [("content", answer[i:i + n]) for i in range(0, len(answer), n)]
        return out

    def usage(self, body: dict[str, Any], answer: str) -> dict[str, Any]:
        prompt = sum(len(orjson.dumps(m.get("content"))) // 4 + 4 for m in body["messages"])
        completion = max(1, len(answer) // 4)
        reasoning = len(self.reasoning) // 4 if self.answer_mode != "plain" else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion + reasoning,
                "total_tokens": prompt + completion + reasoning,
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    async def handle(self, request: Request) -> Response:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return JSONResponse({"error": {"message": "We could not parse the JSON body of your request.",
                                           "type": "invalid_request_error", "param": None, "code": None}}, status_code=400)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.rate_limit > 0 or self.fault == "429":
            self.rate_limit = max(0, self.rate_limit - 1)
            return JSONResponse({"error": {"message": "Rate limit reached for requests", "type": "requests",
                                           "param": None, "code": "rate_limit_exceeded"}}, status_code=429,
                                headers={"retry-after": self.retry_after, "x-ratelimit-reset-requests": "50ms"})
        if self.fault == "500":
            return JSONResponse({"error": {"message": SERVER_ERROR, "type": "server_error", "param": None,
                                           "code": None}}, status_code=500)
        bad = self._reject(body)
        if bad is not None:
            return bad
        if self.fault == "error_event" and not body.get("stream"):
            return JSONResponse({"error": {"message": self.error_message or CONTEXT_TOO_LONG,
                                           "type": "invalid_request_error", "param": "messages",
                                           "code": "context_length_exceeded"}}, status_code=400)
        calls = self.calls_for(body)
        answer = "" if calls else self.answer_for(body)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = body["model"]
        if not body.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
            if self.answer_mode == "think_tags":
                msg["content"] = f"<think>{self.reasoning}</think>\n\n{answer}"
            elif self.answer_mode == "think_no_open":
                msg["content"] = f"{self.reasoning}</think>\n\n{answer}"
            else:
                msg["content"] = answer
                if self.answer_mode == "reasoning_content":
                    msg["reasoning_content"] = self.reasoning
            if calls:
                msg["content"] = None if self.answer_mode != "think_tags" else msg["content"]
                msg["tool_calls"] = calls
            if self.slow:
                await asyncio.sleep(self.slow)
            whole = orjson.dumps({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                  "choices": [{"index": 0, "message": msg, "logprobs": None,
                                               "finish_reason": "tool_calls" if calls else self.finish}],
                                  "usage": self.usage(body, answer), "system_fingerprint": "fp_double"})
            return await blocking_fault(self.fault, self.stall, whole) or Response(whole, media_type="application/json")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pieces = self._content_stream(answer)

        async def gen():  # type: ignore[no-untyped-def]
            def frame(delta: dict[str, Any], finish: str | None = None, usage: Any = None, choices: bool = True) -> bytes:
                chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                         "system_fingerprint": "fp_double",
                                         "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}] if choices else []}
                if self.provider in ("openai", "deepseek"):
                    chunk["usage"] = usage
                return b"data: " + orjson.dumps(chunk) + b"\n\n"

            if self.provider == "deepseek":
                yield b": keep-alive\n\n"
            first: dict[str, Any] = {"role": "assistant", "content": ""}
            if self.provider == "deepseek":
                first = {"role": "assistant", "content": None, "reasoning_content": ""}
            yield frame(first)
            for i, (fld, piece) in enumerate(pieces):
                if self.fail_after is not None and i >= self.fail_after:
                    raise ConnectionResetError("double: upstream killed mid-stream")
                if self.fault and i == self.fault_after:
                    if self.fault == "timeout":
                        await asyncio.sleep(self.stall)
                    elif self.fault == "reset":
                        raise ConnectionResetError("double: upstream killed mid-stream")
                    elif self.fault == "cut":
                        return
                    elif self.fault == "malformed":
                        yield frame({fld: piece})[:40] + b"\n\n"
                    elif self.fault == "error_event":
                        yield b"data: " + orjson.dumps({"error": {
                            "message": self.error_message or SERVER_ERROR, "type": "server_error", "param": None,
                            "code": None}}) + b"\n\n"
                        return
                if self.slow:
                    await asyncio.sleep(self.slow)
                delta = {fld: piece}
                if self.provider == "deepseek":
                    delta = {"content": piece if fld == "content" else None,
                             "reasoning_content": piece if fld == "reasoning_content" else None}
                yield frame(delta)
            for n, c in enumerate(calls):  # as OpenAI streams them: id, type and name first, then the arguments
                yield frame({"tool_calls": [{"index": n, "id": c["id"], "type": "function",
                                             "function": {"name": c["function"]["name"], "arguments": ""}}]})
                args = c["function"]["arguments"]
                for k in range(0, len(args), 7):
                    yield frame({"tool_calls": [{"index": n, "function": {"arguments": args[k:k + 7]}}]})
            finish = "tool_calls" if calls else self.finish
            if self.provider == "deepseek":
                yield frame({"content": "", "reasoning_content": None}, finish,
                            self.usage(body, answer) if include_usage else None)
            else:
                yield frame({}, finish)
                if include_usage:
                    yield frame({}, None, self.usage(body, answer), choices=False)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    def app(self) -> Starlette:
        async def models(_: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "double"}]})

        return Starlette(routes=[
            Route("/v1/chat/completions", self.handle, methods=["POST"]),
            Route("/chat/completions", self.handle, methods=["POST"]),
            Route("/v1/models", models),
        ])
