"""A strict Gemini native API double (v1beta generateContent / streamGenerateContent?alt=sse).

Unknown field names anywhere in the body are rejected with Google's real 400 wording
("Invalid JSON payload received. Unknown name \"X\" at 'path': Cannot find field."); roles other
than user/model are refused; streams are `data: {...}\r\n\r\n` with no [DONE]; thought parts come
before answer parts and every chunk carries usageMetadata (as the recorded fixtures show).

Faults (`fault`, one of FAULTS; the shared ones behave as in the OpenAI double):
- `429`: RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo details (the recorded shape, retryDelay
  `retry_delay`); `rate_limit` N does the same for the first N requests.
- `500`: INTERNAL, Google's wording.
- `timeout`, `reset`, `cut`, `malformed`: as the OpenAI double; `cut` ends a stream after `fault_after`
  answer chunks, so no chunk carries a finishReason (Gemini's only end marker).
- `error_event`: streaming: after `fault_after` answer chunks Google's error object as an SSE event
  (`{"error": {"code": 503, ..., "status": "UNAVAILABLE"}}`, as gateways report seeing mid-stream on a
  200), then the stream ends; blocking: 400 INVALID_ARGUMENT for an input over the token limit.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .openai_double import blocking_fault

OVERLOADED = "The model is overloaded. Please try again later."
INTERNAL = ("An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting")
TOO_MANY_TOKENS = "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."

SCHEMA: dict[str, Any] = {
    "contents": [{"role": None, "parts": [{"text": None, "thought": None, "thoughtSignature": None,
                                           "inlineData": {"mimeType": None, "data": None},
                                           "fileData": {"mimeType": None, "fileUri": None},
                                           "functionCall": None, "functionResponse": None}]}],
    "systemInstruction": {"role": None, "parts": [{"text": None}]},
    "generationConfig": {"temperature": None, "topP": None, "topK": None, "maxOutputTokens": None,
                         "stopSequences": None, "candidateCount": None, "responseMimeType": None, "seed": None,
                         "thinkingConfig": {"thinkingBudget": None, "includeThoughts": None, "thinkingLevel": None}},
    "safetySettings": [{"category": None, "threshold": None}],
    "tools": None, "toolConfig": None, "cachedContent": None,
}


def _unknown(body: Any, schema: Any, path: str) -> tuple[str, str] | None:
    if schema is None:
        return None
    if isinstance(schema, list):
        if not isinstance(body, list):
            return None
        for i, item in enumerate(body):
            found = _unknown(item, schema[0], f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(body, dict):
        for k, v in body.items():
            if k not in schema:
                return k, path or "root"
            found = _unknown(v, schema[k], f"{path}.{k}" if path else k)
            if found:
                return found
    return None


def _camel(obj: Any) -> Any:
    """The proto JSON mapping accepts snake_case too (google-genai sends some of it)."""
    if isinstance(obj, list):
        return [_camel(x) for x in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            head, *rest = k.split("_")
            out[head + "".join(w.title() for w in rest)] = v if k in ("data",) else _camel(v)
        return out
    return obj


def _error(code: int, status: str, message: str, details: list[Any] | None = None) -> JSONResponse:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        err["details"] = details
    return JSONResponse({"error": err}, status_code=code)


@dataclass
class GeminiDouble:
    api_key: str = "AIza-test-double-key-0000"
    thoughts: list[str] = field(default_factory=lambda: ["**Considering the request**\n\nThe user wants an answer."])
    reply: str | None = None
    chunk_size: int = 8
    slow: float = 0.0
    block_prompt: bool = False
    safety_finish: bool = False
    rate_limit: int = 0
    retry_delay: str = "0.05s"
    fault: str | None = None  # one of FAULTS
    fault_after: int = 2  # answer chunks a stream sends before its fault
    stall: float = 5.0  # how long `timeout` stays silent
    error_message: str | None = None  # Google's text for `error_event`
    requests: list[dict[str, Any]] = field(default_factory=list)

    def reset(self, **kw: Any) -> GeminiDouble:
        fresh = GeminiDouble()
        for k in fresh.__dataclass_fields__:
            setattr(self, k, getattr(fresh, k))
        for k, v in kw.items():
            setattr(self, k, v)
        return self

    def answer_for(self, body: dict[str, Any]) -> str:
        if self.reply is not None:
            return self.reply
        texts = [p.get("text", "") for p in body["contents"][-1]["parts"] if "text" in p]
        images = sum(1 for p in body["contents"][-1]["parts"] if "inlineData" in p)
        return f"Answer to: {' '.join(texts)}" + (f" [{images} image(s)]" if images else "")

    def usage(self, body: dict[str, Any], answer: str | None, thoughts: bool) -> dict[str, Any]:
        prompt = len(orjson.dumps(body)) // 4
        th = sum(len(t) for t in self.thoughts) // 4 if thoughts else 0
        u: dict[str, Any] = {"promptTokenCount": prompt, "thoughtsTokenCount": th}
        total = prompt + th
        if answer is not None:
            u["candidatesTokenCount"] = max(1, len(answer) // 4)
            total += u["candidatesTokenCount"]
        u["totalTokenCount"] = total
        u["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
        return u

    async def handle(self, request: Request) -> Response:
        model_method = request.path_params["model_method"].replace("%3A", ":")
        model, _, method = model_method.partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            return _error(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not supported for {method}.")
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if key != self.api_key:
            return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                          [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                            "domain": "googleapis.com"}])
        try:
            body = _camel(orjson.loads(await request.body()))
        except orjson.JSONDecodeError:
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        self.requests.append(body)
        if self.rate_limit > 0 or self.fault == "429":
            self.rate_limit = max(0, self.rate_limit - 1)
            return _error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and "
                          "billing details.",
                          [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                            "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                           {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": self.retry_delay}])
        if self.fault == "500":
            return _error(500, "INTERNAL", INTERNAL)
        found = _unknown(body, SCHEMA, "")
        if found:
            name, at = found
            msg = f"Invalid JSON payload received. Unknown name \"{name}\" at '{at}': Cannot find field."
            return _error(400, "INVALID_ARGUMENT", msg, [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                                          "fieldViolations": [{"field": at, "description": msg}]}])
        if not body.get("contents"):
            return _error(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified\n")
        for c in body["contents"]:
            if c.get("role") not in ("user", "model"):
                return _error(400, "INVALID_ARGUMENT", "Please use a valid role: user, model.")
            for p in c.get("parts", []):
                if "inlineData" in p:
                    try:
                        base64.b64decode(p["inlineData"]["data"], validate=True)
                    except Exception:
                        return _error(400, "INVALID_ARGUMENT", "Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES), Base64 decoding failed")
        include = bool(((body.get("generationConfig") or {}).get("thinkingConfig") or {}).get("includeThoughts"))
        version = model
        rid = uuid.uuid4().hex[:22]
        if self.block_prompt:
            blocked = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
                       "usageMetadata": self.usage(body, None, False), "modelVersion": version, "responseId": rid}
            if method == "generateContent":
                return JSONResponse(blocked)
            return StreamingResponse(iter([b"data: " + orjson.dumps(blocked) + b"\r\n\r\n"]), media_type="text/event-stream")
        answer = self.answer_for(body)
        finish = "SAFETY" if self.safety_finish else "STOP"
        if method == "generateContent":
            if self.fault == "error_event":
                return _error(400, "INVALID_ARGUMENT", self.error_message or TOO_MANY_TOKENS)
            parts: list[dict[str, Any]] = [{"text": t, "thought": True} for t in self.thoughts] if include else []
            parts.append({"text": answer})
            whole = orjson.dumps({"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish,
                                                  "index": 0}],
                                  "usageMetadata": self.usage(body, answer, include), "modelVersion": version,
                                  "responseId": rid})
            return (await blocking_fault(self.fault, self.stall, whole)
                    or Response(whole, media_type="application/json; charset=UTF-8"))

        async def gen():  # type: ignore[no-untyped-def]
            events: list[dict[str, Any]] = []
            if include:
                for t in self.thoughts:
                    events.append({"parts": [{"text": t, "thought": True}], "answer": None})
            pieces = [answer[i:i + self.chunk_size] for i in range(0, len(answer), self.chunk_size)]
            so_far = ""
            for i, piece in enumerate(pieces):
                so_far += piece
                events.append({"parts": [{"text": piece}], "answer": so_far, "last": i == len(pieces) - 1})
            answered = 0
            for ev in events:
                if self.slow:
                    await asyncio.sleep(self.slow)
                if self.fault and ev["answer"] is not None and answered == self.fault_after:
                    if self.fault == "timeout":
                        await asyncio.sleep(self.stall)
                    elif self.fault == "reset":
                        raise ConnectionResetError("double: upstream killed mid-stream")
                    elif self.fault == "cut":
                        return
                    elif self.fault == "malformed":
                        yield b'data: {"candidates": [{"content": {"parts": [{"text": "' + b"\r\n\r\n"
                        answered += 1
                        continue
                    elif self.fault == "error_event":
                        yield b"data: " + orjson.dumps({"error": {"code": 503, "message": self.error_message or OVERLOADED,
                                                                  "status": "UNAVAILABLE"}}) + b"\r\n\r\n"
                        return
                if ev["answer"] is not None:
                    answered += 1
                cand: dict[str, Any] = {"content": {"parts": ev["parts"], "role": "model"}, "index": 0}
                if ev.get("last"):
                    cand["finishReason"] = finish
                chunk = {"candidates": [cand], "usageMetadata": self.usage(body, ev["answer"], include),
                         "modelVersion": version, "responseId": rid}
                yield b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"content-disposition": "attachment"})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1beta/models/{model_method:path}", self.handle, methods=["POST"]),
            Route("/v1/models/{model_method:path}", self.handle, methods=["POST"]),
        ])
