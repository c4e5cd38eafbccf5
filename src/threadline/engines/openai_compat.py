"""OpenAI-compatible chat completions: NIM, xAI Grok, DeepSeek, OpenAI, vLLM, Ollama, llama.cpp.

The request body is built only from documented fields (the profile's allow-list); reasoning comes
from `reasoning_content` deltas or from `<think>` tags in content, and never goes back upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from ..errors import UnsupportedInputError, UpstreamBadResponse, UpstreamStreamError, UpstreamTruncated, redact
from ..media import b64
from ..messages import (
    AnswerReplaced,
    ChatMessage,
    EngineEvent,
    Finished,
    ReasoningDelta,
    TextDelta,
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
        self.url = f"{config.base_url}/chat/completions"
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"

    @property
    def accepts_images(self) -> bool:
        return self.profile.images

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
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return parts

    def build_body(self, req: EngineRequest) -> dict[str, Any]:
        self.refuse_unsupported(req)
        msgs: list[Any] = []
        system_text = "\n\n".join(s for s in req.system if s)
        fold = self.profile.system == "fold"
        if system_text and not fold:
            msgs.append({"role": self.profile.system, "content": system_text})
        messages = req.messages
        done = len(req.openai_history)  # history the cache encoded already: sent as it is
        wires: list[Any] = [*req.openai_history, *({"role": messages[i].role,
                                                   "content": self._content(messages[i], messages[i].text)}
                                                  for i in range(done, len(messages)))]
        if fold and system_text:
            for i, m in enumerate(messages):
                if m.role == "user":  # the first user turn carries the system text
                    wires[i] = {"role": m.role, "content": self._content(m, f"{system_text}\n\n{m.text}")}
                    break
        msgs.extend(wires)
        body: dict[str, Any] = {"model": self.model, "messages": msgs, "stream": req.stream}
        limit = req.max_output_tokens or self.config.max_output_tokens
        if limit:
            body[self.profile.max_tokens_field] = limit
        if req.stream and self.profile.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if self.profile.temperature is not None:
            body["temperature"] = self.profile.temperature
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
        if data.get("usage"):
            events.append(UsageReport(usage_from_openai(data["usage"])))
        events.append(Finished(choices[0].get("finish_reason") if choices else None))
        return events
