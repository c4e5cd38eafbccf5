"""Packs a stateless request: system modules + long-term memory + the newest history that fits the
engine's token budget + the new message.

Token counts were stored with each message when it was written, so packing only adds integers and
reads history newest-first in growing pages: a 10,000-message conversation costs about as much as
a 10-message one once the budget is full.

With a summary (compaction.py), the summary goes in as system text and the walk stops at the last
message it covers: the summary stands in for everything up to there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

import orjson

from .messages import AgentStep, ChatMessage, FunctionCall, FunctionResult, items_from_json
from .tokens import estimate_text

if TYPE_CHECKING:
    from .compaction import Summary

FIRST_PAGE = 64
STEP_OUTPUT_CHARS = 2000  # a tool's output told in history is cut to this (a fetched web page can be huge)
MAX_PAGE = 1024


class HistorySource(Protocol):
    async def history_newest(self, conversation_id: str, *, before_seq: int, limit: int) -> list[dict[str, Any]]: ...


class BranchSource:
    """History of one branch of a forked conversation (rows oldest first, see Store.branch), served
    as `pack` reads history: newest first, in pages."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def history_newest(self, conversation_id: str, *, before_seq: int, limit: int) -> list[dict[str, Any]]:
        older = [r for r in self.rows if r["seq"] < before_seq]
        return older[::-1][:limit]


@dataclass
class Window:
    """The newest history that fits a budget, ready to send: what `pack` would build from the same
    rows, when a source can answer without a row-by-row walk (see HistoryCache.newest_fitting)."""

    rows: list[dict[str, Any]]  # alternating roles, starting with a user turn; plain text, no images
    wires: list[Any]  # each row's message in OpenAI's chat format, pre-encoded (see openai_wire)
    tokens: int
    considered: int  # rows inside the budget, including a leading answer left out to start on a user turn
    dropped: bool
    first_seq: int = 0  # the seq of the oldest row inside the budget (that leading answer included)


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
    # The seq of the oldest history row inside the budget (before_seq when none was): rows older than
    # it, and newer than the summary's last, are the ones left out (what a fold summarises).
    kept_from: int = 0


def memory_text(entries: list[str]) -> str:
    return "What you remember about this user (long-term memory):\n" + "\n".join(f"- {e}" for e in entries)


def _replayed(role: str, text: str) -> bool:
    """Which stored rows go back to an engine: user and assistant turns, but not a failed empty answer."""
    return role == "user" or (role == "assistant" and bool(text))


def _cut(text: str, limit: int = STEP_OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def steps_text(steps: Sequence[AgentStep]) -> str:
    """An engine's own agent steps in words: the tools it ran, with what, and what they returned.
    They are history, not calls to answer, so no engine is ever sent them as function calls."""
    lines: list[str] = []
    for s in steps:
        outputs = {r.call_id: r.output for r in s.results}
        for c in s.calls:
            line = f"[The assistant ran its tool {c.name} with {c.arguments}"
            if c.call_id in outputs:
                line += f"; it returned: {_cut(outputs[c.call_id])}"
            lines.append(line + "]")
    return "\n".join(lines)


def with_steps(text: str, steps: Sequence[AgentStep]) -> str:
    """An answer's text as history tells it: its agent's tool runs first, then the answer."""
    told = steps_text(steps)
    return f"{told}\n{text}" if told and text else told or text


def row_to_message(row: dict[str, Any]) -> ChatMessage | None:
    """History rows become engine messages; failed empty answers are skipped. Reasoning text goes
    along only with function calls (a profile may have to replay it there: DeepSeek thinking mode).
    An engine's own agent steps (a Dify agent app's tool runs) go along in words, never as calls."""
    text = row.get("content") or ""
    parts = row.get("parts")
    if not parts:
        if not _replayed(row["role"], text):
            return None
        return ChatMessage(role=row["role"], text=text)
    items = items_from_json(parts)
    steps = [i for i in items if isinstance(i, AgentStep)]
    if steps:
        text = with_steps(text, steps)
    if row["role"] == "assistant" and row.get("status", "completed") != "completed":
        items = [i for i in items if not isinstance(i, FunctionCall)]  # a cut-short call was never made
    msg = ChatMessage.from_items(row["role"], text, items)
    if msg.calls:
        msg.reasoning = row.get("reasoning")
    if not (text or msg.calls or msg.results or (msg.images and row["role"] == "user")):
        return None
    return msg


def _merged(a: ChatMessage, b: ChatMessage) -> ChatMessage:
    return ChatMessage(a.role, f"{a.text}\n\n{b.text}".strip(), [*a.images, *b.images], a.reasoning or b.reasoning,
                       [*a.calls, *b.calls], [*a.results, *b.results], [*a.states, *b.states])


def _paired(msgs: list[ChatMessage]) -> list[ChatMessage]:
    """Every provider wants each function call answered by the very next message and no answer
    without its call: a call left unanswered (the caller moved on with text) and a result whose call
    fell out of the budget are left out (text kept), so the request is one the provider accepts."""
    out: list[ChatMessage] = []
    for i, m in enumerate(msgs):
        if m.calls:
            nxt = msgs[i + 1] if i + 1 < len(msgs) else None
            answered = {r.call_id for r in nxt.results} if nxt is not None else set()
            calls = [c for c in m.calls if c.call_id in answered]
            if len(calls) != len(m.calls):
                m = ChatMessage(m.role, m.text, m.images, m.reasoning if calls else None, calls, m.results, m.states)
        if m.results:
            prev = out[-1] if out else None
            made = {c.call_id: c.name for c in prev.calls} if prev is not None else {}
            results = [r if r.name else FunctionResult(r.call_id, r.output, made[r.call_id])
                       for r in m.results if r.call_id in made]
            if len(results) != len(m.results) or results != list(m.results):
                m = ChatMessage(m.role, m.text, m.images, m.reasoning, m.calls, results, m.states)
        if not (m.text or m.images or m.calls or m.results):
            continue
        out.append(m)
    return out


def merge_roles(msgs: list[ChatMessage]) -> list[ChatMessage]:
    """Providers want alternating turns; a user turn whose answer failed is merged with the next one.
    Function calls and results are then paired (see _paired)."""
    out: list[ChatMessage] = []
    for m in msgs:
        if out and out[-1].role == m.role:
            out[-1] = _merged(out[-1], m)
        else:
            out.append(m)
    while out and out[0].role != "user":
        out.pop(0)
    if any(m.calls or m.results for m in out):
        out = _paired(out)
        merged: list[ChatMessage] = []  # a call dropped with its empty answer leaves two user turns together
        for m in out:
            if merged and merged[-1].role == m.role:
                merged[-1] = _merged(merged[-1], m)
            else:
                merged.append(m)
        out = merged
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
    summary: Summary | None = None,
) -> Packed:
    system = [s for s in system_modules if s]
    used = sum(estimate_text(s) for s in system) + new_message_tokens
    if memories:
        system.append(memory_text([t for t, _ in memories]))
        used += sum(n for _, n in memories) + 12
    floor = 0  # the newest seq the summary covers: history is read down to just above it
    if summary is not None:
        from .compaction import system_text

        system.append(system_text(summary.text))
        used += summary.tokens
        floor = summary.through_seq
    if conversation_id is not None and before_seq - 1 > floor:
        fitting = getattr(source, "newest_fitting", None)
        win: Window | None = None
        if fitting is not None:
            win = await fitting(conversation_id, before_seq=before_seq, budget=budget - used, after_seq=floor)
        if win is not None and (not win.rows or win.rows[-1]["role"] != new_message.role):
            file_ids = [img.file_id for img in new_message.images if img.file_id and img.data is None]
            return Packed(system, History(win.rows, [new_message]), used + win.tokens, win.considered, win.dropped,
                          file_ids, win.wires, win.first_seq or before_seq)
    picked: list[dict[str, Any]] = []
    dropped = False
    if conversation_id is not None and before_seq - 1 > floor:
        cursor = before_seq
        page = FIRST_PAGE
        full = False
        while not full:
            rows = await source.history_newest(conversation_id, before_seq=cursor, limit=page)
            for r in rows:
                if r["seq"] <= floor:
                    full = True  # the summary stands in for this row and every older one
                    break
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
    kept_from = picked[-1]["seq"] if picked else before_seq
    picked.reverse()
    history = [m for m in map(row_to_message, picked) if m is not None]
    msgs = merge_roles([*history, new_message])
    file_ids = [img.file_id for m in msgs for img in m.images if img.file_id and img.data is None]
    return Packed(system, msgs, used, len(picked), dropped, file_ids, kept_from=kept_from)


def transcript(rows: list[dict[str, Any]], *, limit_chars: int = 12000) -> str:
    """A compact transcript of turns a stateful engine missed, newest kept when it is too long.
    Function calls and their results are told in words: a Dify app has no place for them."""
    lines: list[str] = []
    for r in rows:
        if r["role"] not in ("user", "assistant"):
            continue
        who = "User" if r["role"] == "user" else "Assistant"
        for item in items_from_json(r.get("parts")):
            if isinstance(item, FunctionCall):
                lines.append(f"Assistant called tool {item.name} with {item.arguments}")
            elif isinstance(item, FunctionResult):
                lines.append(f"Tool result{f' of {item.name}' if item.name else ''}: {item.output}")
            elif isinstance(item, AgentStep) and item.calls:
                lines.append(f"Assistant: {steps_text([item])}")
        text = (r.get("content") or "").strip()
        if text:
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
