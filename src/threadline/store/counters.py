"""Usage counters and running-turn slots: the store side of rate limits and budgets.

They live in the store so that every server process on it (`serve --workers N`, several hosts on
one PostgreSQL) shares one count. What is written, and when:

- a turn's admission is ONE transaction: per limited scope ("key:<id>", "app:<name>") one
  conditional UPSERT on its row of the day, which counts the request only if the minute's requests,
  the day's tokens and the day's spend are all under their limits (so a refused request counts
  nothing and cannot push a count past its limit, whatever the other processes do at the same
  moment); and, for a per-user concurrency limit, one conditional INSERT of a slot row. If a later
  check refuses, the earlier ones are undone in the same transaction;
- the turn's end is one transaction too: tokens and spend added to each scope's row of the day, the
  slot row deleted. On SQLite it is queued beside the turn's own final write, so the two share one
  group commit (sqlite_hot);
- nothing at all when neither the app nor the key has limits: the caller never comes here.

Counters are exact integers: spend is counted in nano-units of the limit's currency (a 1e-9 price
step, finer than any per-token price), so sums never drift the way floats would.

Concurrency: SQLite has one writer at a time (across processes), so a statement's check and write
are atomic. PostgreSQL at READ COMMITTED is not, for a check that counts other rows: two admissions
of one user would both count one running turn and both insert. A transaction-scoped advisory lock
on the (app, user) pair serialises just those, and the INSERT's snapshot, taken after the lock,
sees every slot committed before it. The UPSERTs need no lock: each locks its own row.

Why no library: pyrate-limiter, the one with SQL backends, counts requests only (one row per
request), talks to PostgreSQL through psycopg rather than the store's asyncpg, keeps its own tables
outside the migrations, and has nothing for budgets charged after a turn or for concurrent turns.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import TextClause, delete, select, text, update
from sqlalchemy.engine import Connection

from .schema import api_keys, turn_slots
from .sqlite_hot import GAVE_UP

if TYPE_CHECKING:
    from .store import Store

MINUTE = 60
DAY = 86_400

Exec = Callable[[str, dict[str, Any]], list[Any]]


@dataclass(frozen=True, slots=True)
class ScopeCheck:
    """A scope to count a request against, with the limits its row must be under (None: unlimited)."""

    scope: str
    rpm: int | None = None
    tokens: int | None = None
    spend_nanos: int | None = None


@dataclass(frozen=True, slots=True)
class SlotClaim:
    id: str
    app: str
    user: str
    limit: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Refused:
    """Which check refused: `index` into the scopes (-1 for the slot), and the limit's name."""

    index: int
    limit: str


@dataclass(frozen=True, slots=True)
class Charge:
    scope: str
    tokens: int
    spend_nanos: int


@functools.lru_cache(maxsize=16)
def _admit_sql(rpm: bool, tokens: bool, spend: bool) -> str:
    conds = []
    if rpm:
        conds.append("(usage_counters.minute <> :minute OR usage_counters.requests < :rpm)")
    if tokens:
        conds.append("usage_counters.tokens < :tokens_limit")
    if spend:
        conds.append("usage_counters.spend < :spend_limit")
    return ("INSERT INTO usage_counters (scope, day, minute, requests, tokens, spend) "
            "VALUES (:scope, :day, :minute, 1, 0, 0) "
            "ON CONFLICT (scope, day) DO UPDATE SET "
            "requests = CASE WHEN usage_counters.minute = :minute THEN usage_counters.requests + 1 ELSE 1 END, "
            "minute = :minute "
            f"WHERE {' AND '.join(conds) or '1 = 1'} RETURNING requests")


_UNCOUNT = ("UPDATE usage_counters SET requests = requests - 1 "
            "WHERE scope = :scope AND day = :day AND minute = :minute")
_READ = "SELECT minute, requests, tokens, spend FROM usage_counters WHERE scope = :scope AND day = :day"
_CHARGE = ("INSERT INTO usage_counters (scope, day, minute, requests, tokens, spend) "
           "VALUES (:scope, :day, -1, 0, :tokens, :spend) "
           "ON CONFLICT (scope, day) DO UPDATE SET tokens = usage_counters.tokens + excluded.tokens, "
           "spend = usage_counters.spend + excluded.spend")
# CASTs: PostgreSQL types the parameters of an INSERT ... SELECT from the select list, not the table.
_SLOT = ('INSERT INTO turn_slots (id, app, "user", expires_at) '
         "SELECT CAST(:id AS VARCHAR(36)), CAST(:app AS VARCHAR(128)), CAST(:user AS VARCHAR(255)), "
         "CAST(:expires_at AS DOUBLE PRECISION) "
         'WHERE (SELECT count(*) FROM turn_slots WHERE app = :app AND "user" = :user AND expires_at > :now) < :n '
         "RETURNING id")
_SLOT_LOCK = "SELECT pg_advisory_xact_lock(:k)"
_UNSLOT = "DELETE FROM turn_slots WHERE id = :id"


@functools.lru_cache(maxsize=64)
def _text(sql: str) -> TextClause:
    return text(sql)


def _sqlite_exec(conn: sqlite3.Connection) -> Exec:
    return lambda sql, params: conn.execute(sql, params).fetchall()


def _sa_exec(conn: Connection) -> Exec:
    def run(sql: str, params: dict[str, Any]) -> list[Any]:
        res = conn.execute(_text(sql), params)
        return list(res.fetchall()) if res.returns_rows else []
    return run


def _lock_key(app: str, user: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{app}\x00{user}".encode(), digest_size=8).digest(), "big", signed=True)


def windows(now: float) -> tuple[int, int]:
    """(epoch day, epoch minute) of `now`, both UTC."""
    return int(now // DAY), int(now // MINUTE)


class Counters:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.postgres = not store.is_sqlite

    # ---- running a body of statements in one transaction --------------------------------------------

    async def _write(self, body: Callable[[Exec], Any]) -> Any:
        hot = self.store.hot
        if hot is not None:
            res = await hot.write(lambda: body(_sqlite_exec(hot.conn)))
            if res is not GAVE_UP:
                return res
        return await self._write_async(body)

    async def _write_async(self, body: Callable[[Exec], Any]) -> Any:
        async with self.store._tx() as conn:
            return await conn.run_sync(lambda c: body(_sa_exec(c)))

    # ---- admission ----------------------------------------------------------------------------------

    async def admit(self, scopes: list[ScopeCheck], slot: SlotClaim | None, now: float) -> Refused | None:
        """Count one request against every scope and take the slot, or (None of it written) say which
        limit refused."""
        day, minute = windows(now)
        return await self._write(functools.partial(self._admit_body, scopes, slot, day, minute, now))

    def _admit_body(self, scopes: list[ScopeCheck], slot: SlotClaim | None, day: int, minute: int, now: float,
                    x: Exec) -> Refused | None:
        if slot is not None:
            if self.postgres:
                x(_SLOT_LOCK, {"k": _lock_key(slot.app, slot.user)})
            if not x(_SLOT, {"id": slot.id, "app": slot.app, "user": slot.user, "expires_at": slot.expires_at,
                             "now": now, "n": slot.limit}):
                return Refused(-1, "concurrent_turns_per_user")
        for i, s in enumerate(scopes):
            params: dict[str, Any] = {"scope": s.scope, "day": day, "minute": minute}
            if s.rpm is not None:
                params["rpm"] = s.rpm
            if s.tokens is not None:
                params["tokens_limit"] = s.tokens
            if s.spend_nanos is not None:
                params["spend_limit"] = s.spend_nanos
            if x(_admit_sql(s.rpm is not None, s.tokens is not None, s.spend_nanos is not None), params):
                continue
            row = x(_READ, {"scope": s.scope, "day": day})[0]
            for earlier in scopes[:i]:
                x(_UNCOUNT, {"scope": earlier.scope, "day": day, "minute": minute})
            if slot is not None:
                x(_UNSLOT, {"id": slot.id})
            return Refused(i, _which(s, row))
        return None

    # ---- the end of a turn --------------------------------------------------------------------------

    def settle(self, charges: list[Charge], slot_id: str | None, now: float) -> Awaitable[None]:
        """Add a finished turn's tokens and spend, and free its slot. On SQLite the write is queued
        at once, so a write queued next in the same pass of the loop (the turn's final write) shares
        its commit; await the result either way."""
        day, _ = windows(now)

        def body(x: Exec) -> None:
            for c in charges:
                x(_CHARGE, {"scope": c.scope, "day": day, "tokens": c.tokens, "spend": c.spend_nanos})
            if slot_id is not None:
                x(_UNSLOT, {"id": slot_id})

        hot = self.store.hot
        if hot is None:
            return self._write_async(body)
        return self._after_hot(hot.write(lambda: body(_sqlite_exec(hot.conn))), body)

    async def _after_hot(self, queued: Awaitable[Any], body: Callable[[Exec], Any]) -> None:
        if await queued is GAVE_UP:
            await self._write_async(body)

    # ---- slots: renewal and clean-up ----------------------------------------------------------------

    async def renew(self, slot_ids: list[str], until: float) -> None:
        """Keep this process's running turns' slots alive, and drop slots whose process stopped
        renewing them (a crash) once they have expired."""
        async with self.store._tx() as conn:
            if slot_ids:
                await conn.execute(update(turn_slots).where(turn_slots.c.id.in_(slot_ids)).values(expires_at=until))
            await conn.execute(delete(turn_slots).where(turn_slots.c.expires_at < time.time()))

    # ---- keys -----------------------------------------------------------------------------------------

    async def key_limits(self, key_id: str) -> dict[str, Any] | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(api_keys.c.limit_rpm, api_keys.c.limit_tokens_per_day,
                                             api_keys.c.limit_spend_per_day, api_keys.c.limit_currency)
                                      .where(api_keys.c.id == key_id))).mappings().first()
        return dict(row) if row else None

    async def usage(self, scope: str, now: float | None = None) -> dict[str, int]:
        """The scope's counts now: requests this minute, tokens and spend (nano-units) today."""
        day, minute = windows(time.time() if now is None else now)
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(_text(_READ), {"scope": scope, "day": day})).first()
        if row is None:
            return {"requests": 0, "tokens": 0, "spend_nanos": 0}
        return {"requests": row[1] if row[0] == minute else 0, "tokens": row[2], "spend_nanos": row[3]}


def _which(s: ScopeCheck, row: Any) -> str:
    """The limit that refused, naming the one that frees last when several are reached (a client
    told to retry in a minute would only meet the day's limit then)."""
    tokens, spend = row[2], row[3]
    if s.spend_nanos is not None and spend >= s.spend_nanos:
        return "spend_per_day"
    if s.tokens is not None and tokens >= s.tokens:
        return "tokens_per_day"
    return "requests_per_minute"
