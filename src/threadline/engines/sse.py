"""A small, forgiving SSE reader shared by every engine.

It handles what real providers send: `data:` with or without a space, CRLF or LF separators,
`: keep-alive` comments, bare `event: ping` frames, no `[DONE]` (Gemini, Dify), and an error
object sent as bare multi-line JSON instead of a `data:` line (Gemini).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from .http import UpstreamResponse, iter_lines


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: str


async def iter_sse(response: UpstreamResponse) -> AsyncIterator[SSEEvent]:
    event: str | None = None
    data: list[str] = []
    raw: list[str] = []
    async for line in iter_lines(response.aiter_bytes()):
        if line == "":
            if data or event:
                yield SSEEvent(event, "\n".join(data))
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if not sep or field not in ("data", "event", "id", "retry"):
            raw.append(line)
            continue
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data or event:
        yield SSEEvent(event, "\n".join(data))
    if raw:
        yield SSEEvent("raw", "\n".join(raw))
