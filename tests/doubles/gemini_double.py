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

Function calling, as strict as the real service (400 INVALID_ARGUMENT in Google's error shape):
- a `functionResponse` turn must come right after a model turn with `functionCall` parts, with as many
  response parts as call parts, names matching in order (Google's wording for the first two; the name
  rule's wording is the double's own);
- `parameters` takes Google's OpenAPI-subset Schema only (an unknown key such as
  `additionalProperties` is refused as the real service does); `parametersJsonSchema` takes JSON Schema;
- `allowedFunctionNames` only with mode ANY and only names that are declared;
- thinking models (2.5, 3) sign a call with a `thoughtSignature` on its first call part (as the
  recorded gemini-2.5-pro and gemini-3 answers do); a signature sent back must be one the double issued
  (or Google's documented `skip_thought_signature_validator`), else "Corrupted thought signature.";
  Gemini 3 models also refuse a call turn of the current turn whose first call part has none (Google's
  "Function call is missing a thought_signature" 400).
Answers: with tools offered and a user text last, the double calls a tool (the one tool_choice names or
allows, else the first; `parallel_calls` of them); after functionResponse parts it answers
"Tool said: <result>"; with responseMimeType application/json it writes JSON (an example of
responseJsonSchema / responseSchema when given).
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .openai_double import _example, blocking_fault

OVERLOADED = "The model is overloaded. Please try again later."
INTERNAL = ("An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting")
TOO_MANY_TOKENS = "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."
SKIP_SIGNATURES = ("skip_thought_signature_validator", "context_engineering_is_the_way_to_go")
MISSING_SIGNATURE = ("Function call is missing a thought_signature in functionCall parts. This is required for tools "
                     "to work correctly, and missing thought_signature may lead to degraded model performance. "
                     "Additional data, function call `default_api:{name}` , position {pos}. Please refer to "
                     "https://ai.google.dev/gemini-api/docs/thought-signatures for more details.")
# Google's OpenAPI-subset Schema (the `parameters` / `responseSchema` fields): any other key is refused.
SCHEMA_KEYS = {"type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties",
               "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
               "propertyOrdering", "default", "items", "minimum", "maximum"}
FREE = ("args", "response", "parameters", "parametersJsonSchema", "responseJsonSchema", "responseSchema")

SCHEMA: dict[str, Any] = {
    "contents": [{"role": None, "parts": [{"text": None, "thought": None, "thoughtSignature": None,
                                           "inlineData": {"mimeType": None, "data": None},
                                           "fileData": {"mimeType": None, "fileUri": None},
                                           "functionCall": {"name": None, "args": None, "id": None},
                                           "functionResponse": {"name": None, "response": None, "id": None}}]}],
    "systemInstruction": {"role": None, "parts": [{"text": None}]},
    "generationConfig": {"temperature": None, "topP": None, "topK": None, "maxOutputTokens": None,
                         "stopSequences": None, "candidateCount": None, "responseMimeType": None, "seed": None,
                         "presencePenalty": None, "frequencyPenalty": None, "responseSchema": None,
                         "responseJsonSchema": None, "responseModalities": None, "responseLogprobs": None,
                         "logprobs": None,
                         "thinkingConfig": {"thinkingBudget": None, "includeThoughts": None, "thinkingLevel": None}},
    "safetySettings": [{"category": None, "threshold": None}],
    "tools": [{"functionDeclarations": [{"name": None, "description": None, "parameters": None,
                                         "parametersJsonSchema": None, "response": None,
                                         "responseJsonSchema": None, "behavior": None}],
               "googleSearch": None, "codeExecution": None, "urlContext": None}],
    "toolConfig": {"functionCallingConfig": {"mode": None, "allowedFunctionNames": None}},
    "cachedContent": None,
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
            key = head + "".join(w.title() for w in rest)
            # bytes, and the free-form Structs / schemas the caller wrote, keep their keys as they are
            out[key] = v if k == "data" or key in FREE else _camel(v)
        return out
    return obj


def _bad_schema_key(schema: Any, path: str) -> tuple[str, str] | None:
    """The first key of a `parameters` Schema that Google's OpenAPI subset does not have."""
    if not isinstance(schema, dict):
        return None
    for k, v in schema.items():
        if k not in SCHEMA_KEYS:
            return k, path
        if k == "properties" and isinstance(v, dict):
            for name, sub in v.items():
                found = _bad_schema_key(sub, f"{path}.properties[{name}].value")
                if found:
                    return found
        elif k == "items":
            found = _bad_schema_key(v, f"{path}.items")
            if found:
                return found
        elif k == "anyOf" and isinstance(v, list):
            for i, sub in enumerate(v):
                found = _bad_schema_key(sub, f"{path}.any_of[{i}]")
                if found:
                    return found
    return None


def _unknown_name(name: str, at: str) -> JSONResponse:
    msg = f"Invalid JSON payload received. Unknown name \"{name}\" at '{at}': Cannot find field."
    return _error(400, "INVALID_ARGUMENT", msg, [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                                  "fieldViolations": [{"field": at, "description": msg}]}])


def _error(code: int, status: str, message: str, details: list[Any] | None = None) -> JSONResponse:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        err["details"] = details
    return JSONResponse({"error": err}, status_code=code)


@dataclass
class GeminiDouble:
    api_key: str = "AIza-test-double-key-0000"
    # The model's answer to a request, when a test plays the model itself (None: the usual answer).
    answer_hook: Callable[[dict[str, Any]], str | None] | None = None
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
    parallel_calls: int = 1  # how many calls a tool-calling answer makes
    requests: list[dict[str, Any]] = field(default_factory=list)
    signatures: set[str] = field(default_factory=set)  # every thoughtSignature the double issued

    def reset(self, **kw: Any) -> GeminiDouble:
        fresh = GeminiDouble()
        for k in fresh.__dataclass_fields__:
            setattr(self, k, getattr(fresh, k))
        for k, v in kw.items():
            setattr(self, k, v)
        return self

    # ---- function calling ------------------------------------------------------------------------

    def reject_tools(self, body: dict[str, Any], model: str) -> Response | None:
        decls = [d for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]
        for i, t in enumerate(body.get("tools") or ()):
            for j, d in enumerate(t.get("functionDeclarations") or ()):
                if not d.get("name"):
                    return _error(400, "INVALID_ARGUMENT", f"* GenerateContentRequest.tools[{i}].function_declarations"
                                  f"[{j}].name: Name cannot be empty.\n")
                if "parameters" in d and "parametersJsonSchema" in d:
                    return _error(400, "INVALID_ARGUMENT", "parameters and parameters_json_schema cannot both be set.")
                found = _bad_schema_key(d.get("parameters"), f"tools[{i}].function_declarations[{j}].parameters")
                if found:
                    return _unknown_name(*found)
        cfg = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        allowed = cfg.get("allowedFunctionNames")
        if allowed:
            if cfg.get("mode") != "ANY":
                return _error(400, "INVALID_ARGUMENT", "allowed_function_names may only be set when mode is ANY.")
            unknown = [n for n in allowed if n not in {d["name"] for d in decls}]
            if unknown:
                return _error(400, "INVALID_ARGUMENT", f"allowed_function_names {unknown[0]!r} is not declared in "
                              "function_declarations.")
        if cfg.get("mode") not in (None, "AUTO", "ANY", "NONE", "VALIDATED", "MODE_UNSPECIFIED"):
            return _error(400, "INVALID_ARGUMENT", "Invalid value at 'tool_config.function_calling_config.mode' "
                          f"(type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode), "
                          f"\"{cfg.get('mode')}\"")
        contents = body["contents"]
        for i, c in enumerate(contents):
            parts = c.get("parts") or []
            calls = [p["functionCall"] for p in parts if "functionCall" in p]
            responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
            prev = contents[i - 1] if i else None
            prev_calls = [p["functionCall"] for p in (prev or {}).get("parts") or [] if "functionCall" in p]
            if calls and (c["role"] != "model" or (prev is not None and prev["role"] != "user")):
                return _error(400, "INVALID_ARGUMENT", "Please ensure that function call turn comes immediately "
                              "after a user turn or after a function response turn.")
            if responses:
                if c["role"] != "user" or not prev_calls or prev is None or prev["role"] != "model":
                    return _error(400, "INVALID_ARGUMENT", "Please ensure that function response turn comes "
                                  "immediately after a function call turn.")
                if len(responses) != len(prev_calls):
                    return _error(400, "INVALID_ARGUMENT", "Please ensure that the number of function response parts "
                                  "is equal to the number of function call parts of the function call turn.")
                if [r.get("name") for r in responses] != [f.get("name") for f in prev_calls]:
                    return _error(400, "INVALID_ARGUMENT", "Please ensure that each function response part names the "
                                  "function of the function call part it answers, in the same order.")
                if any(not isinstance(r.get("response"), dict) for r in responses):
                    return _error(400, "INVALID_ARGUMENT", f"Invalid value at 'contents[{i}].parts[0].function_response"
                                  ".response' (type.googleapis.com/google.protobuf.Struct)")
            for p in parts:
                sig = p.get("thoughtSignature")
                if sig is not None and sig not in self.signatures and sig not in SKIP_SIGNATURES:
                    return _error(400, "INVALID_ARGUMENT", "Corrupted thought signature.")
        if "gemini-3" in model:  # strict validation of the current turn (since the last user text)
            start = 0
            for i, c in enumerate(contents):
                if c["role"] == "user" and any("text" in p for p in c.get("parts") or ()):
                    start = i
            for i in range(start, len(contents)):
                parts = contents[i].get("parts") or []
                first = next((p for p in parts if "functionCall" in p), None)
                if first is not None and not first.get("thoughtSignature"):
                    return _error(400, "INVALID_ARGUMENT", MISSING_SIGNATURE.format(
                        name=first["functionCall"].get("name"), pos=i + 1))
        return None

    def calls_for(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """With tools offered and a user text last, the double calls a tool, as a model would."""
        decls = [d for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]
        cfg = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        last = body["contents"][-1]
        if not decls or cfg.get("mode") == "NONE" or last["role"] != "user" \
                or any("functionResponse" in p for p in last.get("parts") or ()):
            return []
        names = cfg.get("allowedFunctionNames") or [d["name"] for d in decls]
        text = " ".join(p.get("text", "") for p in last.get("parts") or () if "text" in p)
        return [{"name": n, "args": {"q": text}} for n in names[: self.parallel_calls]]

    def call_parts(self, calls: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        for i, c in enumerate(calls):
            part: dict[str, Any] = {"functionCall": c}
            if i == 0 and ("2.5" in model or "gemini-3" in model):  # signed: the first call part only
                sig = base64.b64encode(uuid.uuid4().bytes * 3).decode()
                self.signatures.add(sig)
                part["thoughtSignature"] = sig
            parts.append(part)
        return parts

    def answer_for(self, body: dict[str, Any]) -> str:
        if self.answer_hook is not None:
            hooked = self.answer_hook(body)
            if hooked is not None:
                return hooked
        if self.reply is not None:
            return self.reply
        gen = body.get("generationConfig") or {}
        if gen.get("responseMimeType") == "application/json":
            schema = gen.get("responseJsonSchema") or gen.get("responseSchema")
            return orjson.dumps(_example(schema) if schema else {"answer": "ok"}).decode()
        responses = [p["functionResponse"]["response"] for p in body["contents"][-1]["parts"]
                     if "functionResponse" in p]
        if responses:
            said = [r["result"] if set(r) == {"result"} else orjson.dumps(r).decode() for r in responses]
            return "Tool said: " + "; ".join(str(x) for x in said)
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
            return _unknown_name(*found)
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
        bad = self.reject_tools(body, model)
        if bad is not None:
            return bad
        include = bool(((body.get("generationConfig") or {}).get("thinkingConfig") or {}).get("includeThoughts"))
        version = model
        rid = uuid.uuid4().hex[:22]
        if self.block_prompt:
            blocked = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
                       "usageMetadata": self.usage(body, None, False), "modelVersion": version, "responseId": rid}
            if method == "generateContent":
                return JSONResponse(blocked)
            return StreamingResponse(iter([b"data: " + orjson.dumps(blocked) + b"\r\n\r\n"]), media_type="text/event-stream")
        calls = self.calls_for(body)
        answer = "" if calls else self.answer_for(body)
        finish = "SAFETY" if self.safety_finish else "STOP"
        if method == "generateContent":
            if self.fault == "error_event":
                return _error(400, "INVALID_ARGUMENT", self.error_message or TOO_MANY_TOKENS)
            parts: list[dict[str, Any]] = [{"text": t, "thought": True} for t in self.thoughts] if include else []
            parts += self.call_parts(calls, model) if calls else [{"text": answer}]
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
            if calls:  # a call comes whole in one chunk, then an empty text part carries the finishReason
                events.append({"parts": self.call_parts(calls, model), "answer": ""})
                events.append({"parts": [{"text": ""}], "answer": "", "last": True})
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
