"""Recent history per conversation, kept in process so a turn reads only what is new.

Packing a stateless request needs the newest messages that fit the budget — often hundreds of rows
per turn. Stored messages never change once their turn has finished, turns on one conversation are
serialised by the turn lock, and `seq` is contiguous per conversation, so a cached run of rows
[lo..hi] stays valid: a turn only has to fetch rows newer than `hi` (written by another process) and
this process appends its own finished turn. (The one exception, an item deleted through the
Conversations API, blanks a stored message; its conversation is then marked forked, and forked
conversations are read from the store, never from here.) Rows holding images are left to pack's row walk, because
hydration attaches the image bytes to their messages.

Each run also keeps prefix sums (tokens, rows that are not a plain message, role repeats), so the
newest history that fits a budget is found by bisection and handed over as slices: a turn over a
full 4k-token window no longer walks hundreds of rows.

The cache is data, not objects: rows hold only strings and numbers, and each row's message is kept
as ready JSON (an `orjson.Fragment`), none of which the garbage collector tracks. A long-lived
process caches tens of thousands of messages, and a full collection walks every tracked object, so
a message object per row stalled every request for milliseconds on each full pass.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .context import Window, openai_wire
from .store import Store

# The cache is bounded by an estimate of the memory it holds, not by a count of conversations: a
# burst of short chats must not evict the long conversations that are dear to read back (hundreds of
# rows each, several milliseconds), and a few long ones must not crowd out everything else.
MAX_BYTES = 64 * 1024 * 1024
ROW_BYTES = 640  # a cached row's own cost beyond its text: dict, numbers, the wire fragment's framing
RUN_BYTES = 800  # a conversation's own cost: its run, lists and place in the index (measured about 600)
MAX_ROWS = 2048  # per conversation: enough for a 128k-token window of short turns
MAX_GAP = 256  # newer rows a cached run catches up on; further behind, it is read afresh


@dataclass
class _Run:
    lo: int  # oldest cached seq; 1 means the run reaches the start of the conversation
    hi: int  # newest cached seq
    rows: list[dict[str, Any]] = field(default_factory=list)  # ascending seq, contiguous
    # Parallel to rows, and prefix sums over them (index i covers rows[:i]):
    wires: list[Any] = field(default_factory=list)  # context.openai_wire of each row (None: no plain message)
    tokens: list[int] = field(default_factory=lambda: [0])
    odd: list[int] = field(default_factory=lambda: [0])  # rows with no plain message (images, skipped)
    repeats: list[int] = field(default_factory=lambda: [0])  # rows whose role repeats the row before
    size: int = RUN_BYTES  # estimated bytes held (see _row_bytes)
    counted: int = 0  # the part of `size` the cache's total includes

    def extend(self, rows: list[dict[str, Any]], wires: list[Any] | None = None) -> None:
        """Append rows (with their wires when already encoded)."""
        if wires is None:
            wires = list(map(openai_wire, rows))
        prev = self.rows[-1]["role"] if self.rows else None
        for r, wire in zip(rows, wires, strict=True):
            self.size += _row_bytes(r)
            self.rows.append(r)
            self.wires.append(wire)
            self.tokens.append(self.tokens[-1] + int(r.get("token_estimate") or 0))
            self.odd.append(self.odd[-1] + (wire is None))
            self.repeats.append(self.repeats[-1] + (r["role"] == prev))
            prev = r["role"]

    def reindex(self, rows: list[dict[str, Any]], wires: list[Any]) -> None:
        self.rows, self.wires, self.tokens, self.odd, self.repeats, self.size = [], [], [0], [0], [0], RUN_BYTES
        self.extend(rows, wires)


def _row_bytes(row: dict[str, Any]) -> int:
    """About what a cached row costs: its text twice (the row's and the encoded wire's), its
    reasoning, and fixed overhead."""
    return ROW_BYTES + 2 * len(row.get("content") or "") + len(row.get("reasoning") or "")


def _new_run(lo: int, hi: int, rows: list[dict[str, Any]]) -> _Run:
    run = _Run(lo, hi)
    run.extend(rows)
    return run


class HistoryCache:
    """A HistorySource (see context.pack) in front of the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self.size = 0  # estimated bytes held by every run

    def forget(self, conversation_id: str) -> None:
        run = self._runs.pop(conversation_id, None)
        if run is not None:
            self.size -= run.counted

    def _put(self, conversation_id: str, run: _Run) -> None:
        if len(run.rows) > MAX_ROWS + MAX_ROWS // 4:  # trimmed in steps, so reindexing is rare
            run.reindex(run.rows[-MAX_ROWS:], run.wires[-MAX_ROWS:])
            run.lo = run.rows[0]["seq"]
        if self._runs.get(conversation_id, run) is not run:
            self.forget(conversation_id)
        self._runs[conversation_id] = run
        self._runs.move_to_end(conversation_id)
        self.size += run.size - run.counted
        run.counted = run.size
        while self.size > MAX_BYTES and len(self._runs) > 1:  # least recently used first
            _, old = self._runs.popitem(last=False)
            self.size -= old.counted

    async def _current(self, conversation_id: str, before_seq: int) -> _Run | None:
        """The cached run, first brought up to `before_seq` with turns another process finished."""
        run = self._runs.get(conversation_id)
        if run is not None and before_seq - 1 - run.hi > MAX_GAP:
            # Far behind (the conversation went on in another process): the newest rows, which pack
            # reads newest first in growing pages, cost less than every row of the gap.
            self.forget(conversation_id)
            return None
        if run is not None and run.hi < before_seq - 1:
            newer = await self.store.history_range(conversation_id, after_seq=run.hi, before_seq=before_seq)
            if newer and newer[0]["seq"] == run.hi + 1:
                run.extend(newer)
                run.hi = newer[-1]["seq"]
                self._put(conversation_id, run)
            else:
                self.forget(conversation_id)
                run = None
        return run

    async def newest_fitting(self, conversation_id: str, *, before_seq: int, budget: int,
                             after_seq: int = 0) -> Window | None:
        """The newest rows before `before_seq` (and after `after_seq`, the last a summary covers)
        whose token estimates fit `budget`, as `pack` would pick them; None when the answer needs
        rows this process does not hold or rows that are not plain alternating messages (pack then
        walks the rows itself)."""
        run = await self._current(conversation_id, before_seq)
        if run is None or run.hi < before_seq - 1:
            return None
        end = len(run.rows) - (run.hi - (before_seq - 1))
        low = min(end, max(0, after_seq + 1 - run.lo))  # the first row the summary does not cover
        start = min(end, bisect_left(run.tokens, run.tokens[end] - budget, low, end + 1))
        if start == low and run.lo > after_seq + 1:
            return None  # older rows might fit too
        if run.odd[end] != run.odd[start] or (start < end and run.repeats[end] != run.repeats[start + 1]):
            return None
        first = start
        if first < end and run.rows[first]["role"] != "user":
            first += 1  # history sent to an engine starts on a user turn
        self._runs.move_to_end(conversation_id)
        return Window(run.rows[first:end], run.wires[first:end], run.tokens[end] - run.tokens[start], end - start,
                      dropped=start > low, first_seq=run.rows[start]["seq"] if start < end else before_seq)

    async def history_newest(self, conversation_id: str, *, before_seq: int, limit: int) -> list[dict[str, Any]]:
        run = await self._current(conversation_id, before_seq)
        if run is not None and run.hi >= before_seq - 1:
            if run.lo <= max(1, before_seq - limit):
                end = len(run.rows) - (run.hi - (before_seq - 1))
                start = max(0, end - limit)
                self._runs.move_to_end(conversation_id)
                return run.rows[start:end][::-1]
        rows = await self.store.history_newest(conversation_id, before_seq=before_seq, limit=limit)
        if not rows:
            return rows
        if run is None:
            if rows[0]["seq"] == before_seq - 1:
                self._put(conversation_id, _new_run(rows[-1]["seq"], rows[0]["seq"], rows[::-1]))
        elif rows[0]["seq"] >= run.lo - 1 and rows[-1]["seq"] < run.lo:
            # An older page that joins the cached run.
            older = [r for r in reversed(rows) if r["seq"] < run.lo]
            run.reindex([*older, *run.rows], [*map(openai_wire, older), *run.wires])
            run.lo = older[0]["seq"]
            self._put(conversation_id, run)
        return rows

    def append_turn(self, conversation_id: str, rows: list[dict[str, Any]]) -> None:
        """A turn this process just finished; kept only if it continues the cached run."""
        if not rows:
            return
        run = self._runs.get(conversation_id)
        first = rows[0]["seq"]
        if run is None:
            if first == 1:
                self._put(conversation_id, _new_run(1, rows[-1]["seq"], rows))
            return
        if run.hi != first - 1:
            self.forget(conversation_id)
            return
        run.extend(rows)
        run.hi = rows[-1]["seq"]
        self._put(conversation_id, run)
