"""Packs a stateless request: system modules + long-term memory + the newest history that fits the
engine's token budget + the new message.

Token counts were stored with each message when it was written, so packing only adds integers and
reads history newest-first in growing pages: a 10,000-message conversation costs about as much as
a 10-message one once the budget is full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import orjson

from .messages import ChatMessage, ImagePart
from .tokens import estimate_text

FIRST_PAGE = 64
MAX_PAGE = 1024


class HistorySource(Protocol):
    async def history_newest(self, conversation_id: str, *, before_seq: int, limit: int) -> list[dict[str, Any]]: ...


@dataclass
class Window:
    """The newest history that fits a budget, ready to send: what `pack` would build from the same
    rows, when a source can answer without a row-by-row walk (see HistoryCache.newest_fitting)."""

    rows: list[dict[str, Any]]  # alternating roles, starting with a user turn; plain text, no images
    wires: list[Any]  # each row's message in OpenAI's chat format, pre-encoded (see openai_wire)
    tokens: int
    considered: int  # rows inside the budget, including a leading answer left out to start on a user turn
    dropped: bool


def openai_wire(row: dict[str, Any]) -> orjson.Fragment | None:
    """A text row's message as OpenAI's chat format encodes it, `{"role": ..., "content": ...}`, kept
    as ready JSON: most engines speak this format, history is resent on every turn, and a row with no
    images encodes the same way for every one of them. None for rows that are no plain message."""
    role, text = row["role"], row.get("content") or ""
    if row.get("parts") or not _replayed(role, text):
        return None
    # Copied to a bytes object of its own size: orjson hands back a buffer with kilobytes to spare,
    # and the cache keeps thousands of these (measured: 4.1 KB per message kept as is, 0.1 KB copied).
    return orjson.Fragment(bytes(memoryview(orjson.dumps({"role": role, "content": text}))))


class History(Sequence[ChatMessage]):
    """Packed history rows followed by the new message(s), read as messages. The rows turn into
    `ChatMessage`s only when an engine reads them that way (once, then kept); an engine speaking
    OpenAI's format sends the rows' pre-encoded wires instead and never builds them."""

    __slots__ = ("_built", "_rows", "_tail")

    def __init__(self, rows: list[dict[str, Any]], tail: list[ChatMessage]) -> None:
        self._rows, self._tail = rows, tail
        self._built: list[ChatMessage] | None = None

    def _list(self) -> list[ChatMessage]:
        if self._built is None:
            self._built = [*(m for m in map(row_to_message, self._rows) if m is not None), *self._tail]
        return self._built

    def __len__(self) -> int:
        return len(self._rows) + len(self._tail)

    @overload
    def __getitem__(self, i: int) -> ChatMessage: ...

    @overload
    def __getitem__(self, i: slice) -> list[ChatMessage]: ...

    def __getitem__(self, i: int | slice) -> ChatMessage | list[ChatMessage]:
        if isinstance(i, int) and self._built is None and i >= len(self._rows):
            return self._tail[i - len(self._rows)]  # the new message: no need to build the history
        return self._list()[i]

    def __iter__(self) -> Iterator[ChatMessage]:
        return iter(self._list())


@dataclass
class Packed:
    system: list[str]
    messages: Sequence[ChatMessage]
    estimated_tokens: int
    history_used: int
    history_dropped: bool
    file_ids: list[str] = field(default_factory=list)
    openai_history: Sequence[Any] = ()  # the first messages' OpenAI wires, when the cache had them ready


def memory_text(entries: list[str]) -> str:
    return "What you remember about this user (long-term memory):\n" + "\n".join(f"- {e}" for e in entries)


def _replayed(role: str, text: str) -> bool:
    """Which stored rows go back to an engine: user and assistant turns, but not a failed empty answer."""
    return role == "user" or (role == "assistant" and bool(text))


def row_to_message(row: dict[str, Any]) -> ChatMessage | None:
    """History rows become engine messages; reasoning is never replayed, failed empty answers skipped."""
    text = row.get("content") or ""
    if not _replayed(row["role"], text):
        return None
    parts = row.get("parts")
    if not parts:
        return ChatMessage(role=row["role"], text=text)
    return ChatMessage(role=row["role"], text=text,
                       images=[ImagePart.from_json(p) for p in parts if p.get("type") == "image"])


def merge_roles(msgs: list[ChatMessage]) -> list[ChatMessage]:
    """Providers want alternating turns; a user turn whose answer failed is merged with the next one."""
    out: list[ChatMessage] = []
    for m in msgs:
        if out and out[-1].role == m.role:
            prev = out[-1]
            out[-1] = ChatMessage(prev.role, f"{prev.text}\n\n{m.text}".strip(), [*prev.images, *m.images])
        else:
            out.append(m)
    while out and out[0].role != "user":
        out.pop(0)
    return out


async def pack(
    source: HistorySource,
    conversation_id: str | None,
    *,
    before_seq: int,
    system_modules: list[str],
    memories: list[tuple[str, int]],
    new_message: ChatMessage,
    new_message_tokens: int,
    budget: int,
) -> Packed:
    system = [s for s in system_modules if s]
    used = sum(estimate_text(s) for s in system) + new_message_tokens
    if memories:
        system.append(memory_text([t for t, _ in memories]))
        used += sum(n for _, n in memories) + 12
    if conversation_id is not None and before_seq > 1:
        fitting = getattr(source, "newest_fitting", None)
        win: Window | None = None
        if fitting is not None:
            win = await fitting(conversation_id, before_seq=before_seq, budget=budget - used)
        if win is not None and (not win.rows or win.rows[-1]["role"] != new_message.role):
            file_ids = [img.file_id for img in new_message.images if img.file_id and img.data is None]
            return Packed(system, History(win.rows, [new_message]), used + win.tokens, win.considered, win.dropped,
                          file_ids, win.wires)
    picked: list[dict[str, Any]] = []
    dropped = False
    if conversation_id is not None and before_seq > 1:
        cursor = before_seq
        page = FIRST_PAGE
        full = False
        while not full:
            rows = await source.history_newest(conversation_id, before_seq=cursor, limit=page)
            for r in rows:
                cost = int(r.get("token_estimate") or 0)
                if used + cost > budget:
                    full = dropped = True
                    break
                used += cost
                picked.append(r)
            if len(rows) < page:
                break
            cursor = rows[-1]["seq"]
            page = min(page * 4, MAX_PAGE)
    picked.reverse()
    history = [m for m in map(row_to_message, picked) if m is not None]
    msgs = merge_roles([*history, new_message])
    file_ids = [img.file_id for m in msgs for img in m.images if img.file_id and img.data is None]
    return Packed(system, msgs, used, len(picked), dropped, file_ids)


def transcript(rows: list[dict[str, Any]], *, limit_chars: int = 12000) -> str:
    """A compact transcript of turns a stateful engine missed, newest kept when it is too long."""
    lines: list[str] = []
    for r in rows:
        text = (r.get("content") or "").strip()
        if not text or r["role"] not in ("user", "assistant"):
            continue
        who = "User" if r["role"] == "user" else "Assistant"
        lines.append(f"{who}: {text}")
    out = "\n".join(lines)
    if len(out) > limit_chars:
        out = "…" + out[-limit_chars:]
    return out


def seeded_query(history: str, query: str) -> str:
    return (
        "[Earlier conversation, for context only; it happened before this chat moved here]\n"
        f"{history}\n[End of earlier conversation]\n\n{query}"
    )
