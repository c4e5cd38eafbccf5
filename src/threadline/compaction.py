"""Conversation compaction: a summary, written by an engine, that stands in for older turns.

Why: a stateless engine is sent the history again on every turn, and a long conversation outgrows
its window. Plain truncation (context.pack) keeps the newest turns and forgets the rest, early facts
included: the user's name given in turn 1 is gone by turn 200. A summary of the dropped turns, sent
as system text, keeps them for a few hundred tokens.

How a summary is kept (no schema change):
- It is a `messages` row with role "summary", outside the turn sequence: its `seq` is negative
  (-1, -2, ... per conversation), so every reader that walks turns by seq (packing, the history
  cache, Dify paging, branches, history hashes) never meets it, and turn seqs keep counting messages.
  `content` is the engine's summary text, `parent_id` and `parts[0]["through_id"]` the last message
  it covers, `token_estimate` what it costs as system text, `usage`/`price`/`engine` what writing it
  cost and who wrote it.
- A summary covers the branch it was made on: the path from the first message to `through_id`. A
  tree's path to a message is unique, so a summary applies to any branch that passes through that
  message, and to no other.
- A summary is extended, never edited: folding more turns writes a new row whose text covers the
  previous summary and the newly folded turns (`previous` names the one it extends).
- The conversation row carries a small mark, `remote["#summary"]` (store.SUMMARY_MARK: the newest
  summary's seq), so a turn knows a summary exists from the row its claim already returns: a
  conversation that never needed one costs no read at all.

The engine is asked once per chunk of turns (one non-streaming request: an instruction as system
text plus the previous summary and a transcript of the turns, function calls and results told in
words as context.transcript tells them). The result goes into the system text of later requests,
never into an assistant message, so every provider shape stays valid: Gemini's systemInstruction,
the DeepSeek-R1 profile folding system text into the first user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .context import transcript
from .messages import Usage
from .tokens import estimate_text

SUMMARY_ROLE = "summary"
# Bounds on one engine request's transcript, in the summariser's own tokens: what its window holds
# after the instruction, the previous summary and room for the answer.
MIN_CHUNK_TOKENS = 256
# An automatic fold asks at most this many requests per turn (each covers one chunk, oldest first,
# and each stored before the next): a conversation imported with 10,000 messages catches up over a
# few turns instead of holding one turn for minutes.
MAX_AUTO_REQUESTS = 4


@dataclass(frozen=True, slots=True)
class Summary:
    """A stored summary as packing uses it: text sent as system text in place of every message of
    the branch up to and including `through_seq`/`through_id`."""

    id: str
    seq: int  # negative: outside the turn sequence
    text: str
    through_id: str
    through_seq: int
    tokens: int  # what `system_text(text)` costs


@dataclass(frozen=True, slots=True)
class Compaction:
    """What compacting a conversation returns: the summary's id and text, the last message it
    covers (`through_id`), what writing it cost, and who wrote it."""

    id: str
    conversation_id: str
    text: str
    through_id: str
    usage: Usage
    engine: str
    model: str
    created_at: float


def system_text(text: str) -> str:
    """How a summary reaches an engine: system text, after the app's modules and memory."""
    return ("Summary of the earlier conversation (it stands in for the older turns, which are not repeated "
            "below):\n" + text)


INSTRUCTION = (
    "You maintain the running summary of a conversation between a user and an AI assistant. The assistant "
    "will continue the conversation from your summary alone, without the turns it replaces, so keep every fact "
    "and detail that may matter later: names, numbers, dates, preferences, decisions, requests still open, "
    "commitments, what tools were run and what they returned. Merge the summary so far with the new turns; "
    "drop pleasantries and repetition. Write in the conversation's language, as terse notes, with no preamble "
    "and no remarks about the summary itself. Stay under {words} words."
)


def prompt(previous: str | None, turns: str) -> str:
    parts = []
    if previous:
        parts.append(f"[Summary so far]\n{previous}\n[End of summary so far]")
    parts.append(f"[Turns to add]\n{turns}\n[End of turns]")
    parts.append("Write the updated summary.")
    return "\n\n".join(parts)


def target_tokens(window: int) -> int:
    """How long a summary may be: an eighth of the history window, at least 128 and at most 2,000
    tokens. Longer is cut (see `bounded`): it would crowd out the turns it makes room for."""
    return max(128, min(2000, window // 8))


def bounded(text: str, limit: int) -> str:
    """`text` cut to about `limit` tokens (a summariser that ignored the length asked for)."""
    if estimate_text(text) <= limit:
        return text
    cut = text[: max(1, limit * 3)]
    while cut and estimate_text(cut) > limit:
        cut = cut[: int(len(cut) * 0.9)]
    return cut.rstrip() + " …"


def first_chunk(rows: Sequence[dict[str, Any]], limit: int) -> int:
    """How many of `rows` (oldest first) one summariser request takes: as many as fit `limit`
    tokens (at least one; transcript() keeps the newest part of a row larger than that), ending on
    an answer rather than on a question whose answer would then wait for the next request."""
    used = n = 0
    for r in rows:
        cost = int(r.get("token_estimate") or 0) + 4
        if n and used + cost > limit:
            break
        used += cost
        n += 1
    if 1 < n < len(rows) and rows[n - 1]["role"] == "user":
        n -= 1
    return n


def turns_text(rows: Sequence[dict[str, Any]], limit_tokens: int) -> str:
    """The transcript of rows for the summariser. Chunks are cut to fit (first_chunk), so only a
    single row larger than the summariser's window is shortened (its newest part kept)."""
    text = transcript(list(rows), limit_chars=1 << 62)
    over = estimate_text(text) - limit_tokens
    if over > 0:
        text = "…" + text[-max(1000, len(text) * limit_tokens // (limit_tokens + over)):]
    return text


def summary_row(text: str, *, through: dict[str, Any], previous: Summary | None, engine: str, model: str,
                usage: Usage, price: dict[str, Any] | None, now: float, first_seq: int) -> dict[str, Any]:
    """The message row that stores a summary (its id and negative seq are given by the store)."""
    return {
        "role": SUMMARY_ROLE, "content": text, "status": "completed", "engine": engine, "model": model,
        "parent_id": through["id"], "token_estimate": estimate_text(system_text(text)),
        "usage": usage.to_json(), "price": price,
        "parts": [{"type": "summary", "through_id": through["id"], "through_seq": int(through["seq"]),
                   "from_seq": first_seq, "previous": previous.id if previous else None}],
        "created_at": now, "updated_at": now,
    }


def summary_from_row(row: dict[str, Any]) -> Summary | None:
    meta = next((p for p in row.get("parts") or () if p.get("type") == "summary"), None)
    if meta is None or row.get("role") != SUMMARY_ROLE:
        return None
    return Summary(str(row["id"]), int(row["seq"]), row.get("content") or "", str(meta["through_id"]),
                   int(meta["through_seq"]), int(row.get("token_estimate") or 0))


def for_branch(summaries: Sequence[Summary], *, before_seq: int,
               branch: Sequence[dict[str, Any]] | None) -> Summary | None:
    """The summary reaching furthest along the branch a turn continues: for a linear conversation
    (`branch` None) every message before `before_seq` is on it; for a tree, the summary's last
    message must be on `branch` (rows oldest first)."""
    on = {r["id"] for r in branch} if branch is not None else None
    best: Summary | None = None
    for s in summaries:
        if s.through_seq >= before_seq or (on is not None and s.through_id not in on):
            continue
        if best is None or (s.through_seq, -s.seq) > (best.through_seq, -best.seq):  # ties: the newest
            best = s
    return best
