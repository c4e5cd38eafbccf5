"""Usage counters and running-turn slots: the store side of rate limits and budgets.

They live in the store so that every server process on it (`serve --workers N`, several hosts on
one PostgreSQL) shares one count. What is written, and when:

- a turn's admission is one write: per limited scope ("key:<id>", "app:<name>") a conditional
  UPSERT on the scope's row of the day, which counts the request only while the minute's requests,
  the day's tokens and the day's spend are all under their limits (so a refused request counts
  nothing, and no count passes its limit whatever other processes do at the same moment); for a
  per-user concurrency limit, first a slot row, inserted only while the user's live slots are
  fewer than the limit. A later refusal undoes the earlier checks;
- the turn's end is one write: its tokens and spend added to each budgeted scope's row of the day,
  its slot row deleted;
- nothing at all when neither the app nor the key has limits: the caller never comes here.

Counters are exact integers: spend is counted in nano-units of the limit's currency (a 1e-9 step,
finer than any per-token price), so sums never drift the way floats would.

SQLite: both writes go through the hot path's group commit (sqlite_hot); the end's write is queued
in the same pass of the loop as the turn's own final write, so the two share one commit. Measured
per statement on this machine: an UPSERT 7 us, but 44 us with RETURNING, and a conditional
INSERT ... SELECT 75 us: SQLite runs both through temporary tables, so the hot path reads rowcount
and counts then inserts (26 us) inside its BEGIN IMMEDIATE, which no other process can write
through. Both tables are WITHOUT ROWID (the key is the table: one B-tree to write instead of two),
which halved the WAL an admission writes (32 to 16 KiB per admission plus settlement).

PostgreSQL: each phase is one statement, run outside a transaction (a statement is atomic), through
asyncpg itself: data-modifying CTEs chained so each check runs only if the one before it passed.
Through SQLAlchemy's async adapter one such statement cost 1.3 ms of CPU here, through asyncpg 0.47.
Without a concurrency limit, undoing after a refusal is a second statement, so for a moment other
admissions see one request too many. A concurrency limit needs more: at READ COMMITTED a statement
that counts a user's slots and inserts one is not atomic (two admissions both count one running
turn and both insert), so its transaction first takes an advisory lock on the (app, user) pair,
and the statement's snapshot, taken after the lock, sees every slot committed before it: four
round trips. The UPSERTs need no lock: each locks its own row and rechecks its condition on it.

Why no library: pyrate-limiter, the one with SQL backends, counts requests only (one row per
request), talks to PostgreSQL through psycopg rather than the store's asyncpg, keeps its own tables
outside the migrations, and has nothing for budgets charged after a turn or for concurrent turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import TextClause, delete, select, text, update
from sqlalchemy.engine import Connection

from .schema import api_keys, turn_slots
from .sqlite_hot import GAVE_UP
from .store import settle

if TYPE_CHECKING:
    from .store import Store

MINUTE = 60
DAY = 86_400

Exec = Callable[[str, dict[str, Any]], Any]  # runs one statement; returns its cursor (rowcount, fetchall)
T = TypeVar("T")


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
            f"WHERE {' AND '.join(conds) or '1 = 1'}")


_UNCOUNT = ("UPDATE usage_counters SET requests = requests - 1 "
            "WHERE scope = :scope AND day = :day AND minute = :minute")
_READ = "SELECT minute, requests, tokens, spend FROM usage_counters WHERE scope = :scope AND day = :day"
_CHARGE = ("INSERT INTO usage_counters (scope, day, minute, requests, tokens, spend) "
           "VALUES (:scope, :day, -1, 0, :tokens, :spend) "
           "ON CONFLICT (scope, day) DO UPDATE SET tokens = usage_counters.tokens + excluded.tokens, "
           "spend = usage_counters.spend + excluded.spend")
_RUNNING = 'SELECT count(*) FROM turn_slots WHERE app = :app AND "user" = :user AND expires_at > :now'
_SLOT = 'INSERT INTO turn_slots (app, "user", id, expires_at) VALUES (:app, :user, :id, :expires_at)'
# Count and insert in one statement, for a transaction that does not hold the write lock before it.
# CASTs: PostgreSQL types the parameters of an INSERT ... SELECT from the select list, not the table.
_SLOT_IF_ROOM = ('INSERT INTO turn_slots (app, "user", id, expires_at) '
                 "SELECT CAST(:app AS VARCHAR(128)), CAST(:user AS VARCHAR(255)), CAST(:id AS VARCHAR(36)), "
                 f"CAST(:expires_at AS DOUBLE PRECISION) WHERE ({_RUNNING}) < :n")
_SLOT_LOCK = "SELECT pg_advisory_xact_lock(:k)"
_UNSLOT = 'DELETE FROM turn_slots WHERE app = :app AND "user" = :user AND id = :id'


# ---- PostgreSQL: one statement per phase ----------------------------------------------------------------
# Each statement is a network round trip there (a turn's own writes take eight), so a phase is one
# statement where it can be: data-modifying CTEs chained so that each check runs only if the one
# before it passed, run outside an explicit transaction (a statement is atomic by itself).

def _pg_scope_cte(i: int, kinds: tuple[bool, bool, bool], after: str | None) -> str:
    rpm, tokens, spend = kinds
    conds = []
    if rpm:
        conds.append(f"(usage_counters.minute <> excluded.minute OR usage_counters.requests < :rpm{i})")
    if tokens:
        conds.append(f"usage_counters.tokens < :tokens_limit{i}")
    if spend:
        conds.append(f"usage_counters.spend < :spend_limit{i}")
    guard = f" WHERE EXISTS (SELECT 1 FROM {after})" if after else ""
    return (f"s{i} AS (INSERT INTO usage_counters (scope, day, minute, requests, tokens, spend) "
            f"SELECT CAST(:scope{i} AS VARCHAR(200)), CAST(:day AS INTEGER), CAST(:minute AS INTEGER), 1, 0, 0{guard} "
            "ON CONFLICT (scope, day) DO UPDATE SET "
            "requests = CASE WHEN usage_counters.minute = excluded.minute THEN usage_counters.requests + 1 ELSE 1 END, "
            f"minute = excluded.minute WHERE {' AND '.join(conds) or '1 = 1'} RETURNING 1)")


@functools.lru_cache(maxsize=64)
def _pg_admit_sql(kinds: tuple[tuple[bool, bool, bool], ...], slot: bool) -> str:
    """Returns one row: 1 or 0 per check (the slot first, if any, then each scope); a 0 means that
    check refused and none after it ran."""
    ctes, names = [], []
    if slot:
        ctes.append(f"slot AS ({_SLOT_IF_ROOM} RETURNING 1)")
        names.append("slot")
    for i, k in enumerate(kinds):
        ctes.append(_pg_scope_cte(i, k, names[-1] if names else None))
        names.append(f"s{i}")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(f'(SELECT count(*) FROM {n})' for n in names)}"


@functools.lru_cache(maxsize=16)
def _pg_settle_sql(charges: int, slot: bool) -> str:
    parts = []
    if charges:
        rows = ", ".join(f"(CAST(:scope{i} AS VARCHAR(200)), CAST(:day AS INTEGER), -1, 0, "
                         f"CAST(:tokens{i} AS BIGINT), CAST(:spend{i} AS BIGINT))" for i in range(charges))
        parts.append(f"INSERT INTO usage_counters (scope, day, minute, requests, tokens, spend) VALUES {rows} "
                     "ON CONFLICT (scope, day) DO UPDATE SET tokens = usage_counters.tokens + excluded.tokens, "
                     "spend = usage_counters.spend + excluded.spend")
    if slot:
        parts.append(_UNSLOT)
    if len(parts) == 2:
        return f"WITH freed AS ({parts[1]}) {parts[0]}"
    return parts[0]


@functools.lru_cache(maxsize=64)
def _text(sql: str) -> TextClause:
    return text(sql)


@functools.lru_cache(maxsize=64)
def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """`:name` parameters as asyncpg's `$1`, `$2` ..., and the names in that order."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", number, sql), tuple(names)


class _PG:
    """Statements with `:name` parameters on an asyncpg connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def fetchrow(self, sql: str, params: dict[str, Any]) -> Any:
        text_, names = _numbered(sql)
        return await self.conn.fetchrow(text_, *(params[n] for n in names))

    async def execute(self, sql: str, params: dict[str, Any]) -> None:
        text_, names = _numbered(sql)
        await self.conn.execute(text_, *(params[n] for n in names))


def _sa_exec(conn: Connection) -> Exec:
    return lambda sql, params: conn.execute(_text(sql), params)


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

    async def _write(self, body: Callable[[Exec, bool], T]) -> T:
        """Run `body(execute, locked)` in one write transaction: on SQLite's hot path (`locked`: the
        transaction holds the write lock from its start), else on the store's async path."""
        hot = self.store.hot
        if hot is not None:
            res = await hot.write(lambda: body(hot.conn.execute, True))
            if res is not GAVE_UP:
                return cast(T, res)  # anything but GAVE_UP is body's result
        return await self._write_async(body)

    async def _write_async(self, body: Callable[[Exec, bool], T]) -> T:
        return await settle(self._write_async_tx(body))  # a cancelled caller never cuts it in half

    async def _write_async_tx(self, body: Callable[[Exec, bool], T]) -> T:
        async with self.store._tx() as conn:
            return await conn.run_sync(lambda c: body(_sa_exec(c), False))

    # ---- admission ----------------------------------------------------------------------------------

    async def admit(self, scopes: list[ScopeCheck], slot: SlotClaim | None, now: float) -> Refused | None:
        """Count one request against every scope and take the slot, or (None of it written) say which
        limit refused."""
        day, minute = windows(now)
        if self.postgres:
            return await self._admit_pg(scopes, slot, day, minute, now)
        return await self._write(functools.partial(self._admit_body, scopes, slot, day, minute, now))

    @contextlib.asynccontextmanager
    async def _asyncpg(self) -> AsyncIterator[_PG]:
        """A pooled connection, used through asyncpg itself, outside any transaction (each statement
        commits by itself). Through SQLAlchemy's async adapter one statement cost about 1.3 ms of
        CPU here (greenlet switches, compilation, result wrapping); straight through asyncpg, a
        fraction of it."""
        async with self.store.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            yield _PG(raw.driver_connection)

    async def _admit_pg(self, scopes: list[ScopeCheck], slot: SlotClaim | None, day: int, minute: int,
                        now: float) -> Refused | None:
        """One statement (one round trip). With a concurrency limit, a transaction around it that
        first takes the (app, user) lock (see the module's docstring): four round trips."""
        params: dict[str, Any] = {"day": day, "minute": minute}
        for i, s in enumerate(scopes):
            params[f"scope{i}"] = s.scope
            if s.rpm is not None:
                params[f"rpm{i}"] = s.rpm
            if s.tokens is not None:
                params[f"tokens_limit{i}"] = s.tokens
            if s.spend_nanos is not None:
                params[f"spend_limit{i}"] = s.spend_nanos
        if slot is not None:
            params.update(app=slot.app, user=slot.user, id=slot.id, expires_at=slot.expires_at, now=now, n=slot.limit)
        sql = _pg_admit_sql(tuple((s.rpm is not None, s.tokens is not None, s.spend_nanos is not None)
                                  for s in scopes), slot is not None)
        async with self._asyncpg() as pg:
            tx = pg.conn.transaction() if slot is not None else contextlib.nullcontext()
            async with tx:
                if slot is not None:
                    await pg.fetchrow(_SLOT_LOCK, {"k": _lock_key(slot.app, slot.user)})
                passed = list(await pg.fetchrow(sql, params))
                if all(passed):
                    return None
                # Refused: undo what the checks before it counted. Without a concurrency limit this is
                # a second statement, so for a moment other admissions see one request too many.
                if slot is not None:
                    if not passed[0]:
                        return Refused(-1, "concurrent_turns_per_user")
                    passed = passed[1:]
                i = passed.index(0)
                row = await pg.fetchrow(_READ, {"scope": scopes[i].scope, "day": day})
                for earlier in scopes[:i]:
                    await pg.execute(_UNCOUNT, {"scope": earlier.scope, "day": day, "minute": minute})
                if slot is not None:
                    await pg.execute(_UNSLOT, {"app": slot.app, "user": slot.user, "id": slot.id})
                return Refused(i, _which(scopes[i], row))

    def _admit_body(self, scopes: list[ScopeCheck], slot: SlotClaim | None, day: int, minute: int, now: float,
                    x: Exec, locked: bool) -> Refused | None:
        # RETURNING is left out: SQLite runs it through a temporary table (an UPSERT took 44 us with
        # it, 7 without); rowcount says the same.
        if slot is not None:
            p = {"app": slot.app, "user": slot.user, "id": slot.id, "expires_at": slot.expires_at, "now": now,
                 "n": slot.limit}
            if locked:  # BEGIN IMMEDIATE: nobody writes between the count and the insert (26 us, vs 75
                # for INSERT ... SELECT, which SQLite runs through a temporary table)
                if x(_RUNNING, p).fetchall()[0][0] >= slot.limit:
                    return Refused(-1, "concurrent_turns_per_user")
                x(_SLOT, p)
            elif x(_SLOT_IF_ROOM, p).rowcount != 1:  # the async path: one statement, atomic
                return Refused(-1, "concurrent_turns_per_user")
        for i, s in enumerate(scopes):
            params: dict[str, Any] = {"scope": s.scope, "day": day, "minute": minute}
            if s.rpm is not None:
                params["rpm"] = s.rpm
            if s.tokens is not None:
                params["tokens_limit"] = s.tokens
            if s.spend_nanos is not None:
                params["spend_limit"] = s.spend_nanos
            if x(_admit_sql(s.rpm is not None, s.tokens is not None, s.spend_nanos is not None), params).rowcount == 1:
                continue
            row = x(_READ, {"scope": s.scope, "day": day}).fetchall()[0]
            for earlier in scopes[:i]:
                x(_UNCOUNT, {"scope": earlier.scope, "day": day, "minute": minute})
            if slot is not None:
                x(_UNSLOT, {"app": slot.app, "user": slot.user, "id": slot.id})
            return Refused(i, _which(s, row))
        return None

    # ---- the end of a turn --------------------------------------------------------------------------

    def settle(self, charges: list[Charge], slot: SlotClaim | None, now: float) -> Awaitable[None]:
        """Add a finished turn's tokens and spend, and free its slot. On SQLite the write is queued
        at once, so a write queued next in the same pass of the loop (the turn's final write) shares
        its commit; await the result either way."""
        day, _ = windows(now)

        def body(x: Exec, _locked: bool) -> None:
            for c in charges:
                x(_CHARGE, {"scope": c.scope, "day": day, "tokens": c.tokens, "spend": c.spend_nanos})
            if slot is not None:
                x(_UNSLOT, {"app": slot.app, "user": slot.user, "id": slot.id})

        if self.postgres:  # one statement, started now: it runs beside the turn's own final write
            return asyncio.ensure_future(self._settle_pg(charges, slot, day))
        hot = self.store.hot
        if hot is None:
            return self._write_async(body)
        return self._after_hot(hot.write(lambda: body(hot.conn.execute, True)), body)

    async def _settle_pg(self, charges: list[Charge], slot: SlotClaim | None, day: int) -> None:
        params: dict[str, Any] = {"day": day}
        for i, c in enumerate(charges):
            params.update({f"scope{i}": c.scope, f"tokens{i}": c.tokens, f"spend{i}": c.spend_nanos})
        if slot is not None:
            params.update(app=slot.app, user=slot.user, id=slot.id)
        async with self._asyncpg() as pg:
            await pg.execute(_pg_settle_sql(len(charges), slot is not None), params)

    async def _after_hot(self, queued: Awaitable[Any], body: Callable[[Exec, bool], Any]) -> None:
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
