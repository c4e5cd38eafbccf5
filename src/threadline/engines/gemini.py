"""Google Gemini, native `generateContent` / `streamGenerateContent?alt=sse`.

Roles are user/model, system text goes in `systemInstruction`, images go inline (Threadline fetches
http(s) URLs itself, through the SSRF guard), `thought: true` parts are reasoning, and a stream has
no `[DONE]`: it just ends.

Tools: caller functions go as `tools: [{"functionDeclarations": [...]}]` with the JSON schema as is in
`parametersJsonSchema` (the field the recorded gemini-2.5/3 requests use; `parameters` takes only
Google's OpenAPI subset); `toolConfig.functionCallingConfig` carries tool_choice. A model turn's calls
go back as `functionCall` parts, with `thoughtSignature` only when Gemini made the call (another
provider's state never reaches Gemini, nor Gemini's another provider); results go back as
`functionResponse` parts, one per call, in the calls' order, matched by name. Gemini gives calls no
ids (or sometimes an `id`): Threadline makes its own, unique per call.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from ..errors import (
    ContentBlockedError,
    UnsupportedParameterError,
    UpstreamBadResponse,
    UpstreamStreamError,
    UpstreamTruncated,
    redact,
)
from ..media import ImageFetcher, b64, split_data_uri
from ..messages import (
    ChatMessage,
    EngineEvent,
    Finished,
    FunctionCall,
    FunctionResult,
    GenerationParams,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    UpstreamAccepted,
    Usage,
    UsageReport,
)
from . import retry
from .base import Engine, EngineRequest
from .http import Poster
from .sse import iter_sse

BLOCK_FINISHES = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
                  "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "LANGUAGE"}
# The model tried a function call and could not make it: the answer is empty, so the turn fails.
CALL_FAILURES = {"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"}
FINISH = {"STOP": "stop", "MAX_TOKENS": "length", **{r: "content_filter" for r in BLOCK_FINISHES}}

# What Gemini's generateContent honours of GenerationParams (providers.md §5.2 and GenerationConfig);
# parallel_tool_calls has no Gemini counterpart and is refused.
GEMINI_PARAMS = frozenset({"temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty",
                           "frequency_penalty", "response_format"})
# reasoning_effort → thinkingConfig (providers.md §5.2 / §5.6): Gemini 3 takes `thinkingLevel`; the 2.5
# series a `thinkingBudget`, with the budgets Google's own OpenAI endpoint maps the efforts to.
THINKING_LEVELS = {"minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH"}
THINKING_BUDGETS = {"none": 0, "low": 1024, "medium": 8192, "high": 24576}
# Gemini 3 refuses (400) a replayed function call without a thought signature in the current turn; a
# call Gemini did not make (another provider's, in a conversation that moved here) has none, and
# Google documents this value for exactly that case (ai.google.dev/gemini-api/docs/thought-signatures).
SKIP_SIGNATURE = "skip_thought_signature_validator"


def usage_from_gemini(u: dict[str, Any]) -> Usage:
    prompt = int(u.get("promptTokenCount") or 0)
    cand = int(u.get("candidatesTokenCount") or 0)
    thoughts = int(u.get("thoughtsTokenCount") or 0)
    total = int(u.get("totalTokenCount") or 0) or prompt + cand + thoughts
    return Usage(prompt, cand + thoughts, total, thoughts, int(u.get("cachedContentTokenCount") or 0))


class GeminiEngine(Engine):
    kind = "gemini"

    def __init__(self, config: Any, http: httpx.AsyncClient | None = None, poster: Poster | None = None) -> None:
        super().__init__(config, http, poster)
        model = quote(config.model, safe="")
        self.url_blocking = f"{config.base_url}/models/{model}:generateContent"
        self.url_stream = f"{config.base_url}/models/{model}:streamGenerateContent?alt=sse"
        self.headers = {"Content-Type": "application/json"}
        if config.api_key:
            self.headers["x-goog-api-key"] = config.api_key
        inc = config.extra.get("include_thoughts")
        m = config.model.lower()
        self.gemini3 = "gemini-3" in m
        self.thinking = "2.5" in m or self.gemini3 or "thinking" in m
        self.include_thoughts = bool(inc) if inc is not None else self.thinking
        # Image URLs are fetched through the SSRF guard's own client, never `self.http` (media.py says why).
        self.images = ImageFetcher(config.allow_hosts)

    async def aclose(self) -> None:
        await self.images.aclose()
        await super().aclose()

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return True

    @property
    def supported_params(self) -> frozenset[str]:  # type: ignore[override]
        return GEMINI_PARAMS | {"reasoning_effort"} if self.thinking else GEMINI_PARAMS

    def check_request(self, tools: Sequence[ToolSpec], tool_choice: ToolChoice | None,
                      params: GenerationParams) -> None:
        super().check_request(tools, tool_choice, params)
        effort = params.reasoning_effort
        if effort is not None and effort not in (THINKING_LEVELS if self.gemini3 else self._budgets()):
            raise UnsupportedParameterError(
                f"Engine {self.name!r} ({self.model}) does not support reasoning_effort {effort!r}; it takes "
                f"{', '.join(THINKING_LEVELS if self.gemini3 else self._budgets())}.", param="reasoning_effort")

    def _budgets(self) -> dict[str, int]:
        if "pro" in self.model.lower():  # 2.5 Pro cannot turn thinking off (providers.md §5.2)
            return {k: v for k, v in THINKING_BUDGETS.items() if k != "none"}
        return THINKING_BUDGETS

    async def _parts(self, m: ChatMessage) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"text": m.text}] if m.text else []
        for img in m.images:
            if img.data is not None:
                parts.append({"inlineData": {"mimeType": img.mime_type or "image/png", "data": b64(img.data)}})
            elif img.url and img.url.startswith("data:"):
                mime, data = split_data_uri(img.url)
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            elif img.url:
                mime, raw = await self.images.fetch(img.url, max_bytes=self.config.max_image_bytes)
                parts.append({"inlineData": {"mimeType": mime, "data": b64(raw)}})
        return parts or [{"text": ""}]

    @staticmethod
    def _call_part(c: FunctionCall, first: bool, gemini3: bool) -> dict[str, Any]:
        try:
            args = orjson.loads(c.arguments or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):  # Gemini takes an object; text a model wrote that is not one goes as is
            args = {"arguments": c.arguments}
        part: dict[str, Any] = {"functionCall": {"name": c.name, "args": args}}
        if c.provider == "gemini" and c.signature:
            part["thoughtSignature"] = c.signature
        elif first and gemini3:
            part["thoughtSignature"] = SKIP_SIGNATURE
        return part

    @staticmethod
    def _response_part(r: FunctionResult, name: str) -> dict[str, Any]:
        try:
            value = orjson.loads(r.output)
        except orjson.JSONDecodeError:
            value = None
        response = value if isinstance(value, dict) else {"result": r.output}
        return {"functionResponse": {"name": name, "response": response}}

    async def _content(self, m: ChatMessage, prev: ChatMessage | None) -> dict[str, Any]:
        if m.role == "assistant":
            parts = [{"text": m.text}] if m.text or not m.calls else []
            # Parallel calls: Gemini signs the first only; a first without Gemini's signature gets the sentinel.
            signed = any(c.provider == "gemini" and c.signature for c in m.calls)
            parts += [self._call_part(c, i == 0 and not signed, self.gemini3) for i, c in enumerate(m.calls)]
            return {"role": "model", "parts": parts}
        if not m.results:
            return {"role": "user", "parts": await self._parts(m)}
        order = {c.call_id: (i, c.name) for i, c in enumerate(prev.calls if prev is not None else ())}
        results = sorted(m.results, key=lambda r: order.get(r.call_id, (len(order), ""))[0])
        parts = [self._response_part(r, r.name or order.get(r.call_id, (0, ""))[1]) for r in results]
        if m.text or m.images:
            parts += await self._parts(m)
        return {"role": "user", "parts": parts}

    @staticmethod
    def tools_wire(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
        decls = []
        for t in tools:
            d: dict[str, Any] = {"name": t.name}
            if t.description is not None:
                d["description"] = t.description
            if t.parameters is not None:
                d["parametersJsonSchema"] = t.parameters
            decls.append(d)
        return [{"functionDeclarations": decls}]

    @staticmethod
    def tool_config(choice: ToolChoice | None, strict: bool) -> dict[str, Any] | None:
        """tool_choice as functionCallingConfig. A `strict` tool (OpenAI's schema adherence; the
        openai-agents SDK sends it on every function tool) is honoured with mode VALIDATED, Gemini's
        "calls adhere to the function schema" mode; ANY already adheres."""
        if choice is not None and choice.mode == "function":
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice.name]}}
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice.mode] if choice is not None else None
        if strict and mode in (None, "AUTO"):
            mode = "VALIDATED"
        return {"functionCallingConfig": {"mode": mode}} if mode else None

    def _generation(self, req: EngineRequest) -> dict[str, Any]:
        p = req.params
        gen: dict[str, Any] = {}
        for name, key in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                          ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
            value = getattr(p, name)
            if value is not None:
                gen[key] = value
        if p.stop is not None:
            gen["stopSequences"] = list(p.stop)
        limit = p.max_tokens or req.max_output_tokens or self.config.max_output_tokens
        if limit:
            gen["maxOutputTokens"] = limit
        rf = p.response_format
        if rf is not None and rf.type != "text":
            gen["responseMimeType"] = "application/json"
            if rf.type == "json_schema" and rf.schema is not None:
                schema = rf.schema
                if rf.description and "description" not in schema:  # Gemini takes it inside the schema
                    schema = {**schema, "description": rf.description}
                gen["responseJsonSchema"] = schema
        thinking: dict[str, Any] = {}
        if self.include_thoughts:
            thinking["includeThoughts"] = True
        if p.reasoning_effort is not None:
            if self.gemini3:
                thinking["thinkingLevel"] = THINKING_LEVELS[p.reasoning_effort]
            else:
                thinking["thinkingBudget"] = THINKING_BUDGETS[p.reasoning_effort]
                if thinking["thinkingBudget"] == 0:
                    thinking.pop("includeThoughts", None)  # no thoughts to include with thinking off
        if thinking:
            gen["thinkingConfig"] = thinking
        return gen

    async def build_body(self, req: EngineRequest) -> dict[str, Any]:
        contents: list[dict[str, Any]] = []
        prev: ChatMessage | None = None
        for m in req.messages:
            contents.append(await self._content(m, prev))
            prev = m
        body: dict[str, Any] = {"contents": contents}
        system_text = "\n\n".join(s for s in req.system if s)
        if system_text:
            body["systemInstruction"] = {"parts": [{"text": system_text}]}
        if req.tools:
            body["tools"] = self.tools_wire(req.tools)
            config = self.tool_config(req.tool_choice, any(t.strict for t in req.tools))
            if config is not None:
                body["toolConfig"] = config
        gen = self._generation(req)
        if gen:
            body["generationConfig"] = gen
        return body

    async def events(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        body = orjson.dumps(await self.build_body(req))
        url = self.url_stream if req.stream else self.url_blocking
        resp = await retry.send(
            lambda: self.poster.post(url, body, self.headers, read_timeout=self.config.timeout),
            max_retries=self.config.max_retries, secrets=(self.config.api_key,), engine=self.name,
        )
        finish: str | None = None
        usage: Usage | None = None
        calls = _Calls()
        try:
            yield UpstreamAccepted()
            if req.stream:
                async for sse in iter_sse(resp):
                    if not sse.data:
                        continue
                    chunk = self._json(sse.data)
                    for ev in self._chunk_events(chunk, calls):
                        yield ev
                    finish = self._finish(chunk) or finish
                    if chunk.get("usageMetadata"):
                        usage = usage_from_gemini(chunk["usageMetadata"])
                if finish is None:  # Gemini's stream has no terminator but the last chunk's finishReason
                    raise UpstreamTruncated("Gemini's stream ended before the answer did (no finishReason).")
            else:
                chunk = self._json(await resp.aread())
                for ev in self._chunk_events(chunk, calls):
                    yield ev
                finish = self._finish(chunk)
                if chunk.get("usageMetadata"):
                    usage = usage_from_gemini(chunk["usageMetadata"])
        finally:
            await resp.aclose()
        if usage is not None:
            yield UsageReport(usage)
        reason = FINISH.get(finish, "stop") if finish else None
        yield Finished("tool_calls" if calls.count and reason in (None, "stop") else reason)

    @staticmethod
    def _json(data: str | bytes) -> dict[str, Any]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamBadResponse("Gemini sent something that is not JSON.") from None
        if not isinstance(chunk, dict):
            raise UpstreamBadResponse("Gemini sent JSON that is not an object.")
        return chunk

    @staticmethod
    def _finish(chunk: dict[str, Any]) -> str | None:
        cands = chunk.get("candidates") or []
        return cands[0].get("finishReason") if cands else None

    def _chunk_events(self, chunk: dict[str, Any], calls: _Calls) -> list[EngineEvent]:
        if isinstance(chunk.get("error"), dict):
            raise UpstreamStreamError("The engine failed mid-stream: " + redact(retry.error_message(chunk, ""),
                                                                               self.config.api_key))
        block = (chunk.get("promptFeedback") or {}).get("blockReason")
        if block and not chunk.get("candidates"):
            raise ContentBlockedError(f"Gemini blocked the prompt ({block}).")
        out: list[EngineEvent] = []
        for cand in (chunk.get("candidates") or [])[:1]:
            for part in (cand.get("content") or {}).get("parts") or []:
                if isinstance(part.get("functionCall"), dict):
                    out.append(calls.delta(part["functionCall"], part.get("thoughtSignature")))
                    continue
                text = part.get("text")
                if not text:
                    continue
                out.append(ReasoningDelta(text) if part.get("thought") else TextDelta(text))
            reason = cand.get("finishReason")
            if reason in BLOCK_FINISHES:
                raise ContentBlockedError(f"Gemini stopped the answer for {reason}.")
            if reason in CALL_FAILURES:
                raise UpstreamBadResponse(f"Gemini could not make the function call it started ({reason}).")
        return out


class _Calls:
    """Numbers one answer's function calls and names them: Gemini's own `id` when it sends one, else
    `call_<n>_<random>`, unique across turns (a result names the call it answers by this id)."""

    def __init__(self) -> None:
        self.count = 0
        self.tag = secrets.token_hex(6)

    def delta(self, fc: dict[str, Any], signature: Any) -> ToolCallDelta:
        name = fc.get("name")
        if not isinstance(name, str) or not name:
            raise UpstreamBadResponse("Gemini sent a function call without a name.")
        args = fc.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise UpstreamBadResponse("Gemini sent function call arguments that are not a JSON object.")
        n, self.count = self.count, self.count + 1
        call_id = fc.get("id") if isinstance(fc.get("id"), str) and fc.get("id") else f"call_{n}_{self.tag}"
        return ToolCallDelta(n, call_id, name, orjson.dumps(args).decode(),
                             signature if isinstance(signature, str) and signature else None)
