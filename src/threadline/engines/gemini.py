"""Google Gemini, native `generateContent` / `streamGenerateContent?alt=sse`.

Roles are user/model, system text goes in `systemInstruction`, images go inline (Threadline fetches
http(s) URLs itself, through the SSRF guard), `thought: true` parts are reasoning, and a stream has
no `[DONE]`: it just ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from ..errors import UpstreamBadResponse, UpstreamError, UpstreamStreamError, UpstreamTruncated, redact
from ..media import ImageFetcher, b64, split_data_uri
from ..messages import (
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
from .http import Poster
from .sse import iter_sse

BLOCK_FINISHES = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
                  "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "LANGUAGE"}


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
        self.include_thoughts = bool(inc) if inc is not None else ("2.5" in m or "gemini-3" in m or "thinking" in m)
        # Image URLs are fetched through the SSRF guard's own client, never `self.http` (media.py says why).
        self.images = ImageFetcher(config.allow_hosts)

    async def aclose(self) -> None:
        await self.images.aclose()
        await super().aclose()

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

    async def build_body(self, req: EngineRequest) -> dict[str, Any]:
        contents: list[dict[str, Any]] = []
        for m in req.messages:
            role = "model" if m.role == "assistant" else "user"
            contents.append({"role": role, "parts": await self._parts(m)})
        body: dict[str, Any] = {"contents": contents}
        system_text = "\n\n".join(s for s in req.system if s)
        if system_text:
            body["systemInstruction"] = {"parts": [{"text": system_text}]}
        gen: dict[str, Any] = {}
        limit = req.params.max_tokens or req.max_output_tokens or self.config.max_output_tokens
        if limit:
            gen["maxOutputTokens"] = limit
        if self.include_thoughts:
            gen["thinkingConfig"] = {"includeThoughts": True}
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
        try:
            yield UpstreamAccepted()
            if req.stream:
                async for sse in iter_sse(resp):
                    if not sse.data:
                        continue
                    chunk = self._json(sse.data)
                    for ev in self._chunk_events(chunk):
                        yield ev
                    finish = self._finish(chunk) or finish
                    if chunk.get("usageMetadata"):
                        usage = usage_from_gemini(chunk["usageMetadata"])
                if finish is None:  # Gemini's stream has no terminator but the last chunk's finishReason
                    raise UpstreamTruncated("Gemini's stream ended before the answer did (no finishReason).")
            else:
                chunk = self._json(await resp.aread())
                for ev in self._chunk_events(chunk):
                    yield ev
                finish = self._finish(chunk)
                if chunk.get("usageMetadata"):
                    usage = usage_from_gemini(chunk["usageMetadata"])
        finally:
            await resp.aclose()
        if usage is not None:
            yield UsageReport(usage)
        yield Finished(finish)

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

    def _chunk_events(self, chunk: dict[str, Any]) -> list[EngineEvent]:
        if isinstance(chunk.get("error"), dict):
            raise UpstreamStreamError("The engine failed mid-stream: " + redact(retry.error_message(chunk, ""),
                                                                               self.config.api_key))
        block = (chunk.get("promptFeedback") or {}).get("blockReason")
        if block and not chunk.get("candidates"):
            raise UpstreamError(f"Gemini blocked the prompt ({block}).", code="content_blocked", status=400)
        out: list[EngineEvent] = []
        for cand in (chunk.get("candidates") or [])[:1]:
            for part in (cand.get("content") or {}).get("parts") or []:
                text = part.get("text")
                if not text:
                    continue
                out.append(ReasoningDelta(text) if part.get("thought") else TextDelta(text))
            reason = cand.get("finishReason")
            if reason in BLOCK_FINISHES:
                raise UpstreamError(f"Gemini stopped the answer for {reason}.", code="content_blocked", status=400)
        return out
