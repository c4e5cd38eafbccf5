"""Recent history per conversation, kept in process so a turn reads only what is new.

Packing a stateless request needs the newest messages that fit the budget — often hundreds of rows
per turn. Stored messages never change once their turn has finished, turns on one conversation are
serialised by the turn lock, and `seq` is contiguous per conversation, so a cached run of rows
[lo..hi] stays valid: a turn only has to fetch rows newer than `hi` (written by another process) and
this process appends its own finished turn. Rows holding images are not turned into cached messages,
because hydration attaches the image bytes to them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .context import row_to_message
from .store import Store

MAX_CONVERSATIONS = 512
MAX_ROWS = 2048


@dataclass
class _Run:
    lo: int  # oldest cached seq; 1 means the run reaches the start of the conversation
    hi: int  # newest cached seq
    rows: list[dict[str, Any]] = field(default_factory=list)  # ascending seq, contiguous


def _prepare(row: dict[str, Any]) -> dict[str, Any]:
    if not row.get("parts"):
        row["_msg"] = row_to_message(row)
    return row


class HistoryCache:
    """A HistorySource (see context.pack) in front of the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._runs: OrderedDict[str, _Run] = OrderedDict()

    def forget(self, conversation_id: str) -> None:
        self._runs.pop(conversation_id, None)

    def _put(self, conversation_id: str, run: _Run) -> None:
        if len(run.rows) > MAX_ROWS:
            run.rows = run.rows[-MAX_ROWS:]
            run.lo = run.rows[0]["seq"]
        self._runs[conversation_id] = run
        self._runs.move_to_end(conversation_id)
        while len(self._runs) > MAX_CONVERSATIONS:
            self._runs.popitem(last=False)

    async def history_newest(self, conversation_id: str, *, before_seq: int, limit: int) -> list[dict[str, Any]]:
        run = self._runs.get(conversation_id)
        if run is not None and run.hi < before_seq - 1:
            # Turns another process finished since we last looked.
            newer = await self.store.history_range(conversation_id, after_seq=run.hi, before_seq=before_seq)
            if newer and newer[0]["seq"] == run.hi + 1:
                run.rows.extend(_prepare(r) for r in newer)
                run.hi = newer[-1]["seq"]
                self._put(conversation_id, run)
            else:
                run = None
        if run is not None and run.hi >= before_seq - 1:
            if run.lo <= max(1, before_seq - limit):
                end = len(run.rows) - (run.hi - (before_seq - 1))
                start = max(0, end - limit)
                self._runs.move_to_end(conversation_id)
                return run.rows[start:end][::-1]
        rows = [_prepare(r) for r in await self.store.history_newest(conversation_id, before_seq=before_seq, limit=limit)]
        if not rows:
            return rows
        if run is None:
            if rows[0]["seq"] == before_seq - 1:
                self._put(conversation_id, _Run(rows[-1]["seq"], rows[0]["seq"], rows[::-1]))
        elif rows[0]["seq"] >= run.lo - 1 and rows[-1]["seq"] < run.lo:
            # An older page that joins the cached run.
            older = [r for r in reversed(rows) if r["seq"] < run.lo]
            run.rows[:0] = older
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
                self._put(conversation_id, _Run(1, rows[-1]["seq"], [_prepare(r) for r in rows]))
            return
        if run.hi != first - 1:
            self.forget(conversation_id)
            return
        run.rows.extend(_prepare(r) for r in rows)
        run.hi = rows[-1]["seq"]
        self._put(conversation_id, run)
