"""OpenAI-compatible chat completions: NIM, xAI Grok, DeepSeek, OpenAI, vLLM, Ollama, llama.cpp.

The request body is built only from documented fields (the profile's allow-list); reasoning comes
from `reasoning_content` deltas or from `<think>` tags in content, and never goes back upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import orjson

from ..errors import UnsupportedInputError, UpstreamBadResponse, UpstreamStreamError, UpstreamTruncated, redact
from ..media import b64
from ..messages import (
    NO_PARAMS,
    AnswerReplaced,
    ChatMessage,
    EngineEvent,
    Finished,
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
from .http import Poster, UpstreamResponse
from .profiles import Profile, ThinkTagSplitter, resolve_profile
from .sse import iter_sse


def usage_from_openai(u: dict[str, Any]) -> Usage:
    prompt = int(u.get("prompt_tokens") or 0)
    completion = int(u.get("completion_tokens") or 0)
    total = int(u.get("total_tokens") or 0) or prompt + completion
    reasoning = int((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    if total > prompt + completion:  # xAI counts reasoning outside completion_tokens
        completion = total - prompt
    cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or u.get("prompt_cache_hit_tokens") or 0)
    return Usage(prompt, completion, total, reasoning, cached)


class OpenAICompatEngine(Engine):
    kind = "openai"

    def __init__(self, config: Any, http: httpx.AsyncClient | None = None, poster: Poster | None = None) -> None:
        super().__init__(config, http, poster)
        self.profile: Profile = resolve_profile(config)
        self.accepts_images = self.profile.images
        self.supported_params = self.profile.params
        self.supports_tools = self.profile.tools
        self.url = f"{config.base_url}/chat/completions"
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"


    # ---- request ---------------------------------------------------------------------------------

    def refuse_unsupported(self, req: EngineRequest) -> None:
        """Images reach a text-only model's engine only from history (the gateway refuses new ones)."""
        if not self.profile.images and any(m.images for m in req.messages):
            raise UnsupportedInputError(
                f"Engine {self.name!r} ({self.model}) cannot read images, and this conversation's history has "
                "some. Continue it on an engine that can, or start a new conversation.")

    def _content(self, m: ChatMessage, text: str) -> str | list[dict[str, Any]]:
        if not m.images:
            return text
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        for img in m.images:
            if img.data is not None:
                url = f"data:{img.mime_type or 'image/png'};base64,{b64(img.data)}"
            else:
                url = img.url or ""
            parts.append({"type": "image_url", "image_url": {"url": url, "detail": img.detail} if img.detail
                          else {"url": url}})
        return parts

    def _wires(self, m: ChatMessage, text: str) -> list[dict[str, Any]]:
        """One neutral message in OpenAI's chat shape: a user message's function results become
        `tool` messages ahead of it; an assistant message's calls become `tool_calls`."""
        if m.results:
            out: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": r.call_id, "content": r.output}
                                         for r in m.results]
            if text or m.images:
                out.append({"role": "user", "content": self._content(m, text)})
            return out
        if m.calls:
            wire: dict[str, Any] = {"role": "assistant", "content": text or None, "tool_calls": [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.calls]}
            if self.profile.replay_reasoning_tool_calls:  # DeepSeek thinking mode wants it back here
                wire["reasoning_content"] = m.reasoning or ""
            return [wire]
        return [{"role": m.role, "content": self._content(m, text)}]

    @staticmethod
    def tools_wire(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
        out = []
        for t in tools:
            fn: dict[str, Any] = {"name": t.name}
            if t.description is not None:
                fn["description"] = t.description
            if t.parameters is not None:
                fn["parameters"] = t.parameters
            if t.strict is not None:
                fn["strict"] = t.strict
            out.append({"type": "function", "function": fn})
        return out

    @staticmethod
    def tool_choice_wire(choice: ToolChoice) -> str | dict[str, Any]:
        if choice.mode == "function":
            return {"type": "function", "function": {"name": choice.name}}
        return choice.mode

    def _params(self, body: dict[str, Any], p: GenerationParams) -> None:
        if p.temperature is not None:
            body["temperature"] = p.temperature
        if p.top_p is not None:
            body["top_p"] = p.top_p
        if p.stop is not None:
            body["stop"] = list(p.stop)
        for name in ("seed", "presence_penalty", "frequency_penalty", "parallel_tool_calls", "reasoning_effort"):
            value = getattr(p, name)
            if value is not None:
                body[name] = value
        rf = p.response_format
        if rf is not None:
            if rf.type == "json_schema":
                js: dict[str, Any] = {"name": rf.name or "response", "schema": rf.schema or {}}
                if rf.strict is not None:
                    js["strict"] = rf.strict
                if rf.description:
                    js["description"] = rf.description
                body["response_format"] = {"type": "json_schema", "json_schema": js}
            else:
                body["response_format"] = {"type": rf.type}

    def build_body(self, req: EngineRequest) -> dict[str, Any]:
        self.refuse_unsupported(req)
        msgs: list[Any] = []
        system_text = "\n\n".join(s for s in req.system if s)
        fold = self.profile.system == "fold" and bool(system_text)
        if system_text and not fold:
            msgs.append({"role": self.profile.system, "content": system_text})
        messages = req.messages
        done = len(req.openai_history)  # history the cache encoded already (plain text rows): sent as it is
        wires: list[Any] = list(req.openai_history)
        if fold:  # the first user turn carries the system text
            for i in range(done):
                if messages[i].role == "user":
                    wires[i] = {"role": "user", "content": self._content(messages[i],
                                                                        f"{system_text}\n\n{messages[i].text}")}
                    fold = False
                    break
        for i in range(done, len(messages)):
            m = messages[i]
            text = m.text
            if fold and m.role == "user":
                text, fold = f"{system_text}\n\n{text}", False
            wires.extend(self._wires(m, text))
        msgs.extend(wires)
        body: dict[str, Any] = {"model": self.model, "messages": msgs, "stream": req.stream}
        limit = req.params.max_tokens or req.max_output_tokens or self.config.max_output_tokens
        if limit:
            body[self.profile.max_tokens_field] = limit
        if req.stream and self.profile.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if self.profile.temperature is not None:
            body["temperature"] = self.profile.temperature
        if req.params != NO_PARAMS:
            self._params(body, req.params)
        if req.tools:
            body["tools"] = self.tools_wire(req.tools)
        if req.tool_choice is not None:
            body["tool_choice"] = self.tool_choice_wire(req.tool_choice)
        bad = set(body) - self.profile.allowed
        if bad:  # a programming error, never a user error: refuse rather than send it
            raise AssertionError(f"refusing to send undocumented fields {sorted(bad)}")
        return body

    # ---- response --------------------------------------------------------------------------------

    async def events(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        body = orjson.dumps(self.build_body(req))
        headers = dict(self.headers)
        if req.stream:
            headers["Accept"] = "text/event-stream"
        timeout = self.config.timeout
        resp = await retry.send(
            lambda: self.poster.post(self.url, body, headers, read_timeout=timeout),
            max_retries=self.config.max_retries, secrets=(self.config.api_key,), engine=self.name,
        )
        try:
            yield UpstreamAccepted()
            if req.stream:
                async for ev in self._stream(resp):
                    yield ev
            else:
                for ev in await self._blocking(resp):
                    yield ev
        finally:
            await resp.aclose()

    def _split(self, splitter: ThinkTagSplitter | None, content: str) -> list[EngineEvent]:
        if splitter is None:
            return [TextDelta(content)]
        return [TextDelta(t) if k == "text" else ReasoningDelta(t) for k, t in splitter.feed(content)]

    def _finish_split(self, splitter: ThinkTagSplitter | None) -> list[EngineEvent]:
        if splitter is None:
            return []
        rest, reclassify = splitter.finish()
        evs: list[EngineEvent] = [TextDelta(t) if k == "text" else ReasoningDelta(t) for k, t in rest]
        if reclassify:
            evs.append(AnswerReplaced("", reason="no_think_tags"))
        return evs

    async def _stream(self, resp: UpstreamResponse) -> AsyncIterator[EngineEvent]:
        splitter = ThinkTagSplitter() if self.profile.think_tags else None
        finish: str | None = None
        done = False
        async for sse in iter_sse(resp):
            data = sse.data
            if not data or sse.event == "ping":
                continue
            if data.startswith("[DONE]"):
                done = True
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamBadResponse("The engine sent a stream chunk that is not JSON.") from None
            if not isinstance(chunk, dict):
                raise UpstreamBadResponse("The engine sent a stream chunk that is not a JSON object.")
            if chunk.get("error"):
                raise UpstreamStreamError(
                    "The engine failed mid-stream: " + redact(retry.error_message(chunk, data), self.config.api_key))
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                rc = delta.get("reasoning_content") or delta.get("reasoning")
                if rc:
                    yield ReasoningDelta(rc)
                content = delta.get("content")
                if content:
                    for ev in self._split(splitter, content):
                        yield ev
                for tc in delta.get("tool_calls") or ():
                    yield _call_delta(tc)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if chunk.get("usage"):
                yield UsageReport(usage_from_openai(chunk["usage"]))
        if not done and finish is None:
            raise UpstreamTruncated("The engine's stream ended before the answer did (no finish reason, no [DONE]).")
        for ev in self._finish_split(splitter):
            yield ev
        yield Finished(finish)

    async def _blocking(self, resp: UpstreamResponse) -> list[EngineEvent]:
        raw = await resp.aread()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamBadResponse("The engine sent a response that is not JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamBadResponse("The engine sent a response that is not a JSON object.")
        if data.get("error"):
            raise UpstreamStreamError("The engine failed: " + redact(retry.error_message(data, ""), self.config.api_key))
        choices = data.get("choices") or []
        msg = (choices[0].get("message") if choices else None) or {}
        events: list[EngineEvent] = []
        rc = msg.get("reasoning_content") or msg.get("reasoning")
        if rc:
            events.append(ReasoningDelta(rc))
        content = msg.get("content") or ""
        splitter = ThinkTagSplitter() if self.profile.think_tags else None
        if content:
            events += self._split(splitter, content)
        events += self._finish_split(splitter)
        for i, tc in enumerate(msg.get("tool_calls") or ()):
            events.append(_call_delta({"index": i, **tc}))
        if data.get("usage"):
            events.append(UsageReport(usage_from_openai(data["usage"])))
        events.append(Finished(choices[0].get("finish_reason") if choices else None))
        return events


def _call_delta(tc: Any) -> ToolCallDelta:
    if not isinstance(tc, dict):
        raise UpstreamBadResponse("The engine sent a tool call that is not a JSON object.")
    fn = tc.get("function") or {}
    args = fn.get("arguments")
    if args is not None and not isinstance(args, str):  # some servers send an object, not its JSON text
        args = orjson.dumps(args).decode()
    return ToolCallDelta(int(tc.get("index") or 0), tc.get("id") or None, fn.get("name") or None, args or "")
