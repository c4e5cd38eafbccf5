"""The store: one async API over SQLite (embedded default) and PostgreSQL.

It knows conversations, messages, memory, files and keys, and nothing about providers or surfaces.
Every list is keyset-paged on an indexed column so page latency does not grow with table size.

A cancelled caller never cuts a write in half. A client hanging up cancels the task that runs its
turn, and the cancellation used to land inside the database driver: an `UPDATE ... RETURNING`
interrupted in aiosqlite's thread left its connection closed with the statement still open, so
SQLite kept the transaction, and its write lock, until the garbage collector finalised the cursor.
Every write in the process, and in every other process, then waited 30 s and failed (3 of 9 runs of
a client closing a slow stream right after a restart). Now writes on the async path run in their own
task to their end (`settle`), and the caller's cancellation comes after; the SQLite hot path runs a
write whole or, if its caller left before the group ran, not at all (`_on_hot`); and a connection
handed back inside a transaction is rolled back on its way into the pool.

Turn leases (`conversations.lock_owner` / `lock_until`) are short and renewed by their process
while the turn lives (gateway.py says how often and why). An answer left `streaming` under a lease
that has expired, or that nobody holds, belongs to a turn that died with its process: it is closed
as failed with the code `interrupted` and keeps the text flushed before the crash, by the next
claim of its conversation, by a read of it, and by the sweeps the gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Text, and_, bindparam, case, cast, delete, event, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from ..errors import ConfigError, NotFoundError
from .schema import api_keys, conversations, files, memories, messages, server_secrets
from .sqlite_hot import GAVE_UP as _GAVE_UP
from .sqlite_hot import SqliteHotPath

_MIGRATIONS = Path(__file__).parent / "migrations"

_MSG_DEFAULTS: dict[str, Any] = {
    "content": "", "parts": None, "reasoning": None, "error": None, "usage": None, "price": None, "engine": None,
    "model": None, "token_estimate": 0, "parent_id": None, "task_id": None, "remote_id": None, "inputs": None,
    "feedback": None, "latency": None, "stop_requested": False, "finish_reason": None,
    "response": None,
}

_CONV_DEFAULTS: dict[str, Any] = {"name": "", "inputs": {}, "remote": {}, "last_seq": 0, "deleted": False, "forked": False,
                                  "lock_owner": None, "lock_until": None, "history_hash": None,
                                  "meta": None, "scratch": False}

# In `conversations.remote`, beside the engines' remote ids: the newest summary's seq (compaction.py),
# so a turn learns a summary exists from the row its claim returns. Engine names cannot start with "#".
SUMMARY_MARK = "#summary"
ROOT_PARENT = "00000000-0000-0000-0000-000000000000"  # a question that starts a branch at the root (Dify's UUID_NIL)
CONV_SORTS = {"created_at", "-created_at", "updated_at", "-updated_at"}
MEMORY_TTL = 2.0  # seconds another process's memory change may take to be seen here

# What a dead turn's answer says: a stable code, and the text that came before the crash stays.
INTERRUPTED: dict[str, Any] = {
    "code": "interrupted", "status": 500, "retryable": True,
    "message": "The answer was cut off: the server writing it stopped before it finished. The text that came "
               "before is kept.",
}

T = TypeVar("T")
P = ParamSpec("P")

_UPDATE_MESSAGE = update(messages).where(messages.c.id == bindparam("b_id"))
_UPDATE_CONVERSATION = update(conversations).where(conversations.c.id == bindparam("b_id"))
_c = conversations.c
# The turn's final write frees the lease only if this process still holds it: one that lost it (not
# renewed in time, taken over) must not free the new holder's. The SET columns are given at execution.
_FINISH_CONVERSATION = _UPDATE_CONVERSATION.values(
    lock_owner=case((_c.lock_owner == bindparam("b_owner"), None), else_=_c.lock_owner),
    lock_until=case((_c.lock_owner == bindparam("b_owner"), None), else_=_c.lock_until),
)


async def settle(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even if the caller is cancelled meanwhile; the cancellation is then
    delivered at the caller's next suspension, after the write (whose result it still gets) is done.

    Cancelling the caller must not cancel the write: halfway through, a database driver leaves its
    connection in a state nobody resets (see the module doc). Raising at once while the write goes on
    in the background is no better: the caller's next write (the stopped answer after a cut partial
    flush) could then land before it and be overwritten by an older text."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    try:
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                if fut.cancelled():  # the write itself was cancelled (the loop is shutting down)
                    raise
                cancelled = True
        return fut.result()
    finally:
        if cancelled:
            _cancel_later()


def _cancel_later() -> None:
    """Deliver a cancellation this task caught at its next suspension instead (the cancel count stays
    as it was, so asyncio.timeout and TaskGroup still see one)."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
        task.cancel()


def _durable(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A write method that cancellation cannot interrupt halfway (see `settle`)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return await settle(method(*args, **kwargs))

    return wrapper


def _lease_free(now: Any, owner: Any) -> Any:
    """The turn lease is free for `owner`: nobody holds it, it expired, or `owner` holds it already."""
    return or_(_c.lock_until.is_(None), _c.lock_until < now, _c.lock_owner == owner)


def _turn_rows(conversation_id: str, seq: int, now: float, user_msg: dict[str, Any],
               assistant_msg: dict[str, Any]) -> list[dict[str, Any]]:
    """A turn's two rows: the user message and the streaming assistant placeholder after it."""
    return [
        {**_MSG_DEFAULTS, "conversation_id": conversation_id, "seq": seq + 1, "role": "user", "status": "completed",
         "created_at": now, "updated_at": now, **user_msg},
        {**_MSG_DEFAULTS, "conversation_id": conversation_id, "seq": seq + 2, "role": "assistant",
         "status": "streaming", "created_at": now + 1e-6, "updated_at": now, **assistant_msg},
    ]


_CLAIM = (
    update(conversations)
    .where(_c.id == bindparam("b_id"), _c.user == bindparam("b_user"), _c.app == bindparam("b_app"),
           _c.deleted.is_(False), _lease_free(bindparam("b_now"), bindparam("b_owner")))
    .values(last_seq=_c.last_seq + 2, updated_at=bindparam("b_now"), lock_owner=bindparam("b_owner"),
            lock_until=bindparam("b_until"))
    .returning(conversations)
)
# The claim of a conversation closes the answer of the turn before it if that turn died (its answer is
# still `streaming` at the previous last seq): the claimer holds the lease now, so nobody is writing it.
_CLOSE_PREVIOUS = (
    update(messages)
    .where(messages.c.conversation_id == bindparam("b_id"), messages.c.seq == bindparam("b_seq"),
           messages.c.status == "streaming")
    .values(status="failed", error=INTERRUPTED, updated_at=bindparam("b_now"))
)
# PostgreSQL: the same two writes in one statement (one round trip, as the claim alone was).
_claimed = _CLAIM.cte("claimed")
_CLAIM_CLOSING_PREVIOUS = select(_claimed).add_cte(
    update(messages)
    .where(messages.c.conversation_id == bindparam("b_id"),
           messages.c.seq == select(_claimed.c.last_seq - 2).scalar_subquery(), messages.c.status == "streaming")
    .values(status="failed", error=INTERRUPTED, updated_at=bindparam("b_now"))
    .cte("closed")
)
_MEMORY = (select(memories).where(memories.c.app == bindparam("b_app"), memories.c.user == bindparam("b_user"))
           .order_by(memories.c.created_at.asc()))


def new_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, 12 more bits of time (its method 3), 62
    random bits. Ids that grow with time put each new row at the right edge of the indexes they key
    instead of on a random page, which halved the WAL written per turn (measured: 24 to 13 KiB).
    Still a UUID wherever Dify's API expects one."""
    ms, ns = divmod(time.time_ns(), 1_000_000)
    value = ((ms << 80) | (0x7 << 76) | ((ns * 4096 // 1_000_000) << 64) | (0b10 << 62)
             | (int.from_bytes(os.urandom(8), "big") >> 2))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _in_transaction(dbapi_conn: Any) -> bool:
    """Whether a pooled driver connection (SQLAlchemy's async adapters) is inside a transaction."""
    driver: Any = getattr(dbapi_conn, "_connection", None)
    if hasattr(driver, "is_in_transaction"):  # asyncpg
        return bool(driver.is_in_transaction())
    inner = getattr(driver, "_connection", None)  # aiosqlite's sqlite3 connection
    return bool(getattr(inner, "in_transaction", False))


def _run_migrations(conn: Connection) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


class Store:
    def __init__(self, database_url: str, *, echo: bool = False) -> None:
        self.url = database_url
        self.is_sqlite = database_url.startswith("sqlite")
        if not (self.is_sqlite or database_url.startswith("postgresql")):
            scheme = database_url.split(":", 1)[0]
            raise ConfigError(f"unsupported database_url {scheme!r}: use sqlite+aiosqlite or postgresql+asyncpg")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            if ":memory:" in database_url or database_url.rstrip("/").endswith("sqlite+aiosqlite:"):
                raise ConfigError("use a file for SQLite; an in-memory database is not shared between connections")
            path = database_url.split(":///", 1)[-1]
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._sqlite_path = path.split("?", 1)[0]
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=20, max_overflow=20, pool_pre_ping=False)
        # Every use of a connection ends its own transaction (begin() commits or rolls back, connect()
        # rolls back on close), so the pool's extra rollback on return is a wasted round trip.
        kwargs["pool_reset_on_return"] = None
        kwargs["json_serializer"] = lambda v: orjson.dumps(v).decode()
        kwargs["json_deserializer"] = orjson.loads
        # SQL parameters are user text, answers and ids: they stay out of error messages and logs.
        kwargs["hide_parameters"] = True
        aiosqlite_log = logging.getLogger("aiosqlite")
        if aiosqlite_log.level == logging.NOTSET:  # it logs every statement with its parameters at DEBUG
            aiosqlite_log.setLevel(logging.INFO)
        self.engine: AsyncEngine = create_async_engine(database_url, **kwargs)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # The turn's writes skip the async adapter on SQLite (see sqlite_hot); opened after migrate().
        self.hot: SqliteHotPath | None = None
        self._memory_cache: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}
        self._memory_reads: dict[tuple[str, str], asyncio.Task[list[dict[str, Any]]]] = {}
        self._memory_generation = 0  # bumped by every local memory change
        if self.is_sqlite:
            @event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

        @event.listens_for(self.engine.sync_engine, "reset")
        def _clean(dbapi_conn: Any, _record: Any, reset: Any) -> None:
            """No connection goes back to the pool inside a transaction. Every use ends its own
            (so the pool's rollback on return is off), but one that could not end it (its rollback
            interrupted) would otherwise hand an open transaction, and on SQLite the write lock,
            to the next user. Checked in memory; a rollback runs only when one is open."""
            if reset.transaction_was_reset or not reset.asyncio_safe or not _in_transaction(dbapi_conn):
                return
            dbapi_conn.rollback()  # the adapter's own transaction, if it knows of one
            if _in_transaction(dbapi_conn):  # asyncpg's adapter rolls back only transactions it began
                await_only(dbapi_conn._connection.execute("ROLLBACK"))

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction. SQLite allows one writer: contending connections would fall into its
        busy handler, which sleeps in millisecond steps, so this process queues its writers itself."""
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    async def _on_hot(self, write: Callable[..., Any], *args: Any, always: bool = False) -> Any:
        """A write on the SQLite hot path, group-committed with whatever else is being written (see
        sqlite_hot); _GAVE_UP when another process kept SQLite's write lock and the caller must take
        the waiting async path (through `settle`).

        Cancellation cannot cut it in half either: the flusher runs a write whole. A caller cancelled
        before its group ran has its write skipped, unless `always` (then it waits for it, as with
        `settle`); one whose group has run gets the result, and the cancellation at its next
        suspension."""
        fut = self.hot.write(functools.partial(write, *args))  # type: ignore[union-attr]
        if always:
            return await settle(fut)  # a future: no task of its own
        try:
            return await fut
        except asyncio.CancelledError:
            if not fut.done() or fut.cancelled():
                raise
            _cancel_later()
            return fut.result()

    async def migrate(self) -> None:
        async with self._tx() as conn:
            await conn.run_sync(_run_migrations)
        if self.is_sqlite and self.hot is None:
            self.hot = SqliteHotPath(self._sqlite_path, self._write_lock)  # type: ignore[arg-type]

    async def close(self) -> None:
        reads = list(self._memory_reads.values())
        for read in reads:
            read.cancel()
        # Awaited, so a read cut off mid-query has handed its connection back before the pool is
        # disposed (a connection left to the garbage collector warns at interpreter exit).
        await asyncio.gather(*reads, return_exceptions=True)
        if self.hot is not None:
            self.hot.close()
            self.hot = None
        await self.engine.dispose()

    # ---- conversations ---------------------------------------------------------------------------

    @_durable
    async def create_conversation(
        self, *, app: str, user: str, engine: str, name: str = "", inputs: dict[str, Any] | None = None,
        conversation_id: str | None = None, created_at: float | None = None,
    ) -> dict[str, Any]:
        now = created_at or time.time()
        row = {
            "id": conversation_id or new_id(), "app": app, "user": user, "engine": engine, "name": name,
            "inputs": inputs or {}, "remote": {}, "last_seq": 0, "created_at": now, "updated_at": now,
            "deleted": False, "lock_owner": None, "lock_until": None,
        }
        async with self._tx() as conn:
            await conn.execute(insert(conversations).values(**row))
        return row

    async def get_conversation(self, conversation_id: str, *, app: str | None, user: str) -> dict[str, Any]:
        """Someone else's conversation and a missing one raise the same not-found."""
        if self.hot is not None:
            read, hot = self.hot.read_conversation(conversation_id)
            if read:
                if hot is None or hot["user"] != user or (app is not None and hot["app"] != app):
                    raise NotFoundError("Conversation Not Exists.")
                return hot
        conds = [conversations.c.id == conversation_id, conversations.c.user == user,
                 conversations.c.deleted.is_(False)]
        if app is not None:
            conds.append(conversations.c.app == app)
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(conversations).where(*conds))).mappings().first()
        if row is None:
            raise NotFoundError("Conversation Not Exists.")
        return dict(row)

    async def list_conversations(
        self, *, app: str | None, user: str, last_id: str | None = None, limit: int = 20,
        sort_by: str = "-updated_at",
    ) -> tuple[list[dict[str, Any]], bool]:
        if sort_by not in CONV_SORTS:
            raise ValueError(f"sort_by must be one of {sorted(CONV_SORTS)}")
        desc = sort_by.startswith("-")
        col = conversations.c[sort_by.lstrip("-")]
        conds = [conversations.c.user == user, conversations.c.deleted.is_(False), conversations.c.scratch.is_(False)]
        if app is not None:
            conds.append(conversations.c.app == app)
        async with self.engine.connect() as conn:
            if last_id:
                last = (await conn.execute(
                    select(col, conversations.c.id).where(conversations.c.id == last_id, *conds)
                )).first()
                if last is None:
                    raise NotFoundError("Last Conversation Not Exists.")
                v, lid = last
                if desc:
                    conds.append(or_(col < v, and_(col == v, conversations.c.id < lid)))
                else:
                    conds.append(or_(col > v, and_(col == v, conversations.c.id > lid)))
            order = (col.desc(), conversations.c.id.desc()) if desc else (col.asc(), conversations.c.id.asc())
            q = select(conversations).where(*conds).order_by(*order).limit(limit + 1)
            rows = [dict(r) for r in (await conn.execute(q)).mappings().all()]
        return rows[:limit], len(rows) > limit

    @_durable
    async def rename_conversation(self, conversation_id: str, *, app: str | None, user: str, name: str) -> dict[str, Any]:
        conv = await self.get_conversation(conversation_id, app=app, user=user)
        now = time.time()
        async with self._tx() as conn:
            await conn.execute(update(conversations).where(conversations.c.id == conversation_id)
                               .values(name=name, updated_at=now))
        conv.update(name=name, updated_at=now)
        return conv

    @_durable
    async def delete_conversation(self, conversation_id: str, *, app: str | None, user: str) -> None:
        await self.get_conversation(conversation_id, app=app, user=user)
        async with self._tx() as conn:
            await conn.execute(update(conversations).where(conversations.c.id == conversation_id).values(deleted=True))

    async def conversation_in_app(self, conversation_id: str, *, app: str) -> dict[str, Any]:
        """A conversation of `app`, whoever its user: the OpenAI-style surfaces, where the key (its
        app) owns what it made. Another app's conversation and a missing one raise the same not-found."""
        if self.hot is not None:
            read, hot = self.hot.read_conversation(conversation_id)
            if read:
                if hot is None or hot["app"] != app or hot["scratch"]:
                    raise NotFoundError("Conversation Not Exists.")
                return hot
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(conversations).where(
                conversations.c.id == conversation_id, conversations.c.app == app,
                conversations.c.deleted.is_(False), conversations.c.scratch.is_(False)))).mappings().first()
        if row is None:
            raise NotFoundError("Conversation Not Exists.")
        return dict(row)

    @_durable
    async def purge_scratch(self, *, idle_before: float) -> int:
        """Remove the scratch conversations (store: false) nobody has used since `idle_before` and
        no turn holds: what a process that died mid-response left behind."""
        now = time.time()
        async with self._tx() as conn:
            ids = [r[0] for r in await conn.execute(select(conversations.c.id).where(
                conversations.c.scratch.is_(True), conversations.c.updated_at < idle_before,
                or_(conversations.c.lock_until.is_(None), conversations.c.lock_until < now)))]
            if ids:
                await conn.execute(delete(messages).where(messages.c.conversation_id.in_(ids)))
                await conn.execute(delete(conversations).where(conversations.c.id.in_(ids)))
        return len(ids)

    @_durable
    async def purge_conversation(self, conversation_id: str) -> None:
        """Remove a conversation and its messages for good (a `store: false` response leaves nothing)."""
        async with self._tx() as conn:
            await conn.execute(delete(messages).where(messages.c.conversation_id == conversation_id))
            await conn.execute(delete(conversations).where(conversations.c.id == conversation_id))

    @_durable
    async def set_remote(self, conversation_id: str, engine: str, remote_id: str | None, seen_seq: int) -> None:
        async with self._tx() as conn:
            cur = (await conn.execute(select(conversations.c.remote).where(conversations.c.id == conversation_id))).scalar()
            remote = dict(cur or {})
            if remote_id is None:
                remote.pop(engine, None)
            else:
                remote[engine] = {"id": remote_id, "seq": seen_seq}
            await conn.execute(update(conversations).where(conversations.c.id == conversation_id).values(remote=remote))

    @_durable
    async def set_conversation_fields(self, conversation_id: str, **values: Any) -> None:
        async with self._tx() as conn:
            await conn.execute(update(conversations).where(conversations.c.id == conversation_id).values(**values))

    # ---- the per-conversation turn lock (works across processes) -------------------------------

    @_durable
    async def try_lock(self, conversation_id: str, owner: str, ttl: float) -> bool:
        now = time.time()
        async with self._tx() as conn:
            res = await conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id, _lease_free(now, owner))
                .values(lock_owner=owner, lock_until=now + ttl)
            )
        return res.rowcount == 1

    @_durable
    async def unlock(self, conversation_id: str, owner: str) -> None:
        async with self._tx() as conn:
            await conn.execute(update(conversations)
                               .where(conversations.c.id == conversation_id, conversations.c.lock_owner == owner)
                               .values(lock_owner=None, lock_until=None))

    # ---- messages ------------------------------------------------------------------------------

    async def begin_turn(
        self, conversation_id: str, *, user_msg: dict[str, Any], assistant_msg: dict[str, Any],
        new_conversation: dict[str, Any] | None = None, lock: tuple[str, float] | None = None,
    ) -> tuple[int, int]:
        """Write the user message and the assistant placeholder in one transaction.

        The user message is durable before any upstream call. For a new conversation, the
        conversation row (already holding the turn lock) is inserted in the same transaction.
        """
        now = time.time()
        if self.hot is not None and new_conversation is not None:
            row = {**_CONV_DEFAULTS, **new_conversation, "last_seq": 2}
            if lock:
                row["lock_owner"], row["lock_until"] = lock[0], now + lock[1]
            if await self._on_hot(self.hot.begin_turn, _turn_rows(conversation_id, 0, now, user_msg, assistant_msg),
                                  row) is not _GAVE_UP:
                return 1, 2
        return await self._begin_turn_tx(conversation_id, now, user_msg, assistant_msg, new_conversation, lock)

    @_durable
    async def _begin_turn_tx(self, conversation_id: str, now: float, user_msg: dict[str, Any],
                             assistant_msg: dict[str, Any], new_conversation: dict[str, Any] | None,
                             lock: tuple[str, float] | None) -> tuple[int, int]:
        async with self._tx() as conn:
            if new_conversation is not None:
                row = dict(new_conversation)
                if lock:
                    row["lock_owner"], row["lock_until"] = lock[0], now + lock[1]
                row["last_seq"] = 2
                await conn.execute(insert(conversations).values(**row))
                seq = 0
            else:
                seq = (await conn.execute(
                    update(conversations).where(conversations.c.id == conversation_id)
                    .values(last_seq=conversations.c.last_seq + 2, updated_at=now)
                    .returning(conversations.c.last_seq)
                )).scalar_one() - 2
            await conn.execute(insert(messages), _turn_rows(conversation_id, seq, now, user_msg, assistant_msg))
        return seq + 1, seq + 2

    @_durable
    async def import_conversation(self, conversation: dict[str, Any], turns: list[dict[str, Any]]) -> None:
        """A new conversation with finished turns (an OpenAI client's message list, a Dify export),
        written in one transaction: an import that fails leaves nothing behind. Each turn is
        `{"user": {...message fields}, "assistant": {...message fields}}`, oldest first."""
        now = time.time()
        rows: list[dict[str, Any]] = []
        for i, t in enumerate(turns):
            at = float(t.get("created_at") or now) + i * 1e-5
            user_msg, asst_msg = dict(t["user"]), dict(t["assistant"])
            user_msg.setdefault("id", new_id())
            asst_msg.setdefault("id", new_id())
            asst_msg.setdefault("parent_id", user_msg["id"])
            asst_msg.setdefault("status", "completed")
            user_row, asst_row = _turn_rows(conversation["id"], 2 * i, at, user_msg, asst_msg)
            rows += [user_row, asst_row]
        conv = {**_CONV_DEFAULTS, **conversation, "last_seq": len(rows)}
        async with self._tx() as conn:
            await conn.execute(insert(conversations).values(**conv))
            if rows:
                await conn.execute(insert(messages), rows)

    async def claim_turn(
        self, conversation_id: str, *, app: str, user: str, owner: str, ttl: float,
        user_msg: dict[str, Any], assistant_msg: dict[str, Any],
    ) -> tuple[dict[str, Any], int, int] | None:
        """Start a turn on an existing conversation in one transaction: check ownership, take the turn
        lease, allocate two seqs and write the user message and the assistant placeholder.

        A lease that has expired is free: its turn died (its process renews it while it lives), and
        the answer that turn left `streaming` is closed as `interrupted` in the same transaction.

        Returns (conversation, user seq, assistant seq); None while another turn holds the lease;
        raises NotFoundError for a conversation that is missing, deleted or someone else's.
        """
        now = time.time()
        if self.hot is not None:
            params = {"id": conversation_id, "user": user, "app": app, "now": now, "owner": owner, "until": now + ttl}
            conv = await self._on_hot(self.hot.claim, params,
                                      lambda seq: _turn_rows(conversation_id, seq, now, user_msg, assistant_msg),
                                      INTERRUPTED)
            if conv is False:
                raise NotFoundError("Conversation Not Exists.")
            if conv is None:
                return None
            if conv is not _GAVE_UP:
                seq = conv["last_seq"] - 2
                return conv, seq + 1, seq + 2
        return await self._claim_turn_tx(conversation_id, app, user, owner, ttl, now, user_msg, assistant_msg)

    @_durable
    async def _claim_turn_tx(self, conversation_id: str, app: str, user: str, owner: str, ttl: float, now: float,
                             user_msg: dict[str, Any],
                             assistant_msg: dict[str, Any]) -> tuple[dict[str, Any], int, int] | None:
        params = {"b_id": conversation_id, "b_user": user, "b_app": app, "b_now": now, "b_owner": owner,
                  "b_until": now + ttl}
        async with self._tx() as conn:
            if self.is_sqlite:  # no UPDATE inside WITH: two statements
                row = (await conn.execute(_CLAIM, params)).mappings().first()
                if row is not None:
                    await conn.execute(_CLOSE_PREVIOUS, {"b_id": conversation_id, "b_seq": row["last_seq"] - 2,
                                                         "b_now": now})
            else:
                row = (await conn.execute(_CLAIM_CLOSING_PREVIOUS, params)).mappings().first()
            if row is None:
                c = conversations.c
                exists = (await conn.execute(select(c.id).where(
                    c.id == conversation_id, c.user == user, c.app == app, c.deleted.is_(False)))).first()
                if exists is None:
                    raise NotFoundError("Conversation Not Exists.")
                return None
            seq = row["last_seq"] - 2
            await conn.execute(insert(messages), _turn_rows(conversation_id, seq, now, user_msg, assistant_msg))
        return dict(row), seq + 1, seq + 2

    @_durable
    async def change_messages(
        self, conversation_id: str, *, owner: str, new_rows: list[dict[str, Any]] | None = None,
        edit: tuple[str, Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
        new_conversation: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]] | None:
        """Change a conversation's messages outside a turn (the Conversations API's items): append
        finished `new_rows` after its newest message, or apply `edit` = (message id, function of the
        row → values to set) to one of its messages, in one transaction that runs only while no turn
        holds the conversation's lease (a running turn's rows never interleave with these). For a
        new conversation (`new_conversation`) the row is inserted in the same transaction.

        An appended assistant row that follows a user row answers it (parent_id), as a turn's pair
        does. The history hash is cleared: the conversation no longer continues the history it named.
        Returns the rows written (or the edited row); None while a turn holds the lease; raises
        NotFoundError for a missing or deleted conversation or a message not in it."""
        now = time.time()
        new_rows = new_rows or []
        n = len(new_rows)
        async with self._tx() as conn:
            if new_conversation is not None:
                await conn.execute(insert(conversations).values(
                    **{**_CONV_DEFAULTS, **new_conversation, "last_seq": n, "created_at": now, "updated_at": now}))
                seq = 0
            else:
                # An edited message breaks what every process's history cache relies on (a finished
                # message never changes): the conversation is then read from the store, as a forked one.
                changed: dict[str, Any] = {"forked": True} if edit is not None else {}
                res = (await conn.execute(
                    update(conversations)
                    .where(_c.id == conversation_id, _c.deleted.is_(False), _lease_free(now, owner))
                    .values(last_seq=_c.last_seq + n, updated_at=now, history_hash=None, **changed)
                    .returning(_c.last_seq))).first()
                if res is None:
                    exists = (await conn.execute(select(_c.id).where(
                        _c.id == conversation_id, _c.deleted.is_(False)))).first()
                    if exists is None:
                        raise NotFoundError("Conversation Not Exists.")
                    return None
                seq = res[0] - n
            if edit is not None:
                q = select(messages).where(messages.c.id == edit[0], messages.c.conversation_id == conversation_id)
                if not self.is_sqlite:
                    q = q.with_for_update()
                found = (await conn.execute(q)).mappings().first()
                if found is None:
                    raise NotFoundError("Message Not Exists.")
                values = {**edit[1](dict(found)), "updated_at": now}
                await conn.execute(update(messages).where(messages.c.id == edit[0]).values(**values))
                return [{**dict(found), **values}]
            if not n:
                return []
            prev = None
            if seq:
                prev = (await conn.execute(select(messages.c.id, messages.c.role).where(
                    messages.c.conversation_id == conversation_id, messages.c.seq == seq))).first()
            rows: list[dict[str, Any]] = []
            prev_id, prev_role = (prev[0], prev[1]) if prev is not None else (None, None)
            for i, r in enumerate(new_rows):
                row = {**_MSG_DEFAULTS, "status": "completed", **r, "conversation_id": conversation_id,
                       "seq": seq + 1 + i, "created_at": now + i * 1e-6, "updated_at": now}
                row.setdefault("id", new_id())
                if row["role"] == "assistant" and prev_role == "user" and row.get("parent_id") is None:
                    row["parent_id"] = prev_id
                prev_id, prev_role = row["id"], row["role"]
                rows.append(row)
            await conn.execute(insert(messages), rows)
        return rows

    @_durable
    async def update_message(self, message_id: str, **values: Any) -> None:
        values.setdefault("updated_at", time.time())
        async with self._tx() as conn:
            await conn.execute(update(messages).where(messages.c.id == message_id).values(**values))

    @_durable
    async def flush_partial(self, message_id: str, content: str, reasoning: str | None) -> bool:
        """Persist the answer so far; returns True when someone asked (from any process) to stop."""
        async with self._tx() as conn:
            res = await conn.execute(
                update(messages).where(messages.c.id == message_id)
                .values(content=content, reasoning=reasoning, updated_at=time.time())
                .returning(messages.c.stop_requested)
            )
            return bool(res.scalar())

    async def finish_turn(self, conversation_id: str, message_id: str, lock_owner: str | None,
                          conversation_values: dict[str, Any] | None = None, **values: Any) -> None:
        """The answer's final write; frees the turn lease if `lock_owner` still holds it. It runs to
        its end even if the caller is cancelled meanwhile (the cancellation comes after)."""
        now = time.time()
        values["updated_at"] = now
        cv: dict[str, Any] = {"updated_at": now, **(conversation_values or {})}
        if self.hot is not None:
            if await self._on_hot(self.hot.finish_turn, conversation_id, message_id, cv, values,
                                  lock_owner, always=True) is not _GAVE_UP:
                return
        await self._finish_turn_tx(conversation_id, message_id, lock_owner, cv, values)

    @_durable
    async def _finish_turn_tx(self, conversation_id: str, message_id: str, lock_owner: str | None,
                              cv: dict[str, Any], values: dict[str, Any]) -> None:
        async with self._tx() as conn:
            # Prebuilt statements with the SET columns given at execution: no per-call statement building.
            await conn.execute(_UPDATE_MESSAGE, {"b_id": message_id, **values})
            if lock_owner:
                await conn.execute(_FINISH_CONVERSATION, {"b_id": conversation_id, "b_owner": lock_owner, **cv})
            else:
                await conn.execute(_UPDATE_CONVERSATION, {"b_id": conversation_id, **cv})

    # ---- leases of live turns, and the answers dead turns left -------------------------------------

    async def renew_leases(self, owner: str, conversation_ids: list[str], ttl: float) -> set[str]:
        """Extend every lease `owner` holds among `conversation_ids`, in one statement; returns the
        ids renewed (a lease missing from them was lost: swept or taken over after it expired)."""
        if not conversation_ids:
            return set()
        until = time.time() + ttl
        if self.hot is not None:
            renewed = await self._on_hot(self.hot.renew, owner, conversation_ids, until)
            if renewed is not _GAVE_UP:
                return set(renewed)
        return await self._renew_tx(owner, conversation_ids, until)

    @_durable
    async def _renew_tx(self, owner: str, conversation_ids: list[str], until: float) -> set[str]:
        async with self._tx() as conn:
            res = await conn.execute(update(conversations)
                                     .where(_c.lock_owner == owner, _c.id.in_(conversation_ids))
                                     .values(lock_until=until).returning(_c.id))
            return {r[0] for r in res}

    @_durable
    async def release_turn(self, conversation_id: str, owner: str, message_id: str | None = None) -> None:
        """End a turn that could not write its answer's final state: the answer, if still
        `streaming`, is closed as interrupted (its flushed text stays), and the lease is freed if
        `owner` holds it."""
        now = time.time()
        async with self._tx() as conn:
            if message_id:
                await conn.execute(update(messages).where(messages.c.id == message_id, messages.c.status == "streaming")
                                   .values(status="failed", error=INTERRUPTED, updated_at=now))
            await conn.execute(update(conversations).where(_c.id == conversation_id, _c.lock_owner == owner)
                               .values(lock_owner=None, lock_until=None))

    async def sweep_interrupted(self) -> list[str]:
        """Close the answers turns left `streaming` when their process died, in every conversation
        whose lease has expired (a live turn's lease never does: its process renews it), and free
        those leases. Returns the ids of the answers closed. The partial index on `lock_until`
        holds only leases in use, so finding them costs next to nothing."""
        now = time.time()
        async with self.engine.connect() as conn:
            expired = [r[0] for r in await conn.execute(
                select(_c.id).where(_c.lock_until.is_not(None), _c.lock_until < now))]
        if not expired:
            return []
        return await self._close_interrupted(expired, now)

    @_durable
    async def _close_interrupted(self, conversation_ids: list[str], now: float) -> list[str]:
        """In each conversation, close the answers that are `streaming` with no live turn behind
        them: an older answer than the last (a later turn has begun), or any while the lease has
        expired or is free. The conditions are checked in the write itself: a turn that claims the
        conversation meanwhile is never touched. Expired leases are freed."""
        closed: list[str] = []
        m = messages.c
        async with self._tx() as conn:
            for cid in conversation_ids:
                last = select(_c.last_seq).where(_c.id == cid).scalar_subquery()
                until = select(_c.lock_until).where(_c.id == cid).scalar_subquery()
                res = await conn.execute(
                    update(messages)
                    .where(m.conversation_id == cid, m.status == "streaming",
                           or_(m.seq < last, until.is_(None), until < now))
                    .values(status="failed", error=INTERRUPTED, updated_at=now).returning(m.id))
                closed.extend(r[0] for r in res)
            await conn.execute(update(conversations).where(_c.id.in_(conversation_ids), _c.lock_until < now)
                               .values(lock_owner=None, lock_until=None))
        return closed

    async def _repair(self, conversation_id: str, rows: list[dict[str, Any]]) -> None:
        """A read that finds an answer `streaming` checks that a live turn is behind it; if none is
        (see _close_interrupted), the answer is closed and `rows` show it closed. Reads of live or
        finished answers write nothing."""
        streaming = [r for r in rows if r["status"] == "streaming"]
        if not streaming:
            return
        async with self.engine.connect() as conn:
            conv = (await conn.execute(select(_c.last_seq, _c.lock_until).where(_c.id == conversation_id))).first()
        now = time.time()
        if conv is None:
            return
        free = conv.lock_until is None or conv.lock_until < now
        if not free and all(r["seq"] >= conv.last_seq for r in streaming):
            return  # the answer of the turn running now
        closed = set(await self._close_interrupted([conversation_id], now))
        for r in streaming:
            if r["id"] in closed:
                r.update(status="failed", error=dict(INTERRUPTED), updated_at=now)

    _HISTORY_COLS = (messages.c.seq, messages.c.role, messages.c.content, messages.c.parts, messages.c.reasoning,
                     messages.c.status, messages.c.token_estimate, messages.c.engine)

    async def history_newest(self, conversation_id: str, *, before_seq: int, limit: int) -> list[dict[str, Any]]:
        """Newest-first slice of history for packing: only the columns packing needs."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(*self._HISTORY_COLS)
                .where(messages.c.conversation_id == conversation_id, messages.c.seq < before_seq,
                       messages.c.seq > 0)  # summaries (seq < 0) are no turns
                .order_by(messages.c.seq.desc()).limit(limit)
            )).mappings().all()
        return [dict(r) for r in rows]

    async def history_range(self, conversation_id: str, *, after_seq: int, before_seq: int) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(*self._HISTORY_COLS)
                .where(messages.c.conversation_id == conversation_id, messages.c.seq > after_seq,
                       messages.c.seq < before_seq)
                .order_by(messages.c.seq.asc())
            )).mappings().all()
        return [dict(r) for r in rows]

    async def history_rows(self, conversation_id: str, *, after_seq: int, before_seq: int,
                           limit: int | None = None) -> list[dict[str, Any]]:
        """history_range with each row's id, the oldest `limit`: turns a summary is written from."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(messages.c.id, *self._HISTORY_COLS)
                .where(messages.c.conversation_id == conversation_id, messages.c.seq > max(0, after_seq),
                       messages.c.seq < before_seq)
                .order_by(messages.c.seq.asc()).limit(limit)
            )).mappings().all()
        return [dict(r) for r in rows]

    # ---- summaries (compaction.py): rows outside the turn sequence, at seq -1, -2, ... ------------

    async def summaries(self, conversation_id: str) -> list[dict[str, Any]]:
        """Every summary of a conversation, newest first."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(messages).where(messages.c.conversation_id == conversation_id, messages.c.seq < 0)
                .order_by(messages.c.seq.asc())
            )).mappings().all()
        return [dict(r) for r in rows]

    @_durable
    async def add_summary(self, conversation_id: str, row: dict[str, Any]) -> dict[str, Any]:
        """Store a summary at the next free negative seq and mark the conversation (SUMMARY_MARK),
        in one transaction; returns the row with its id and seq. Two writers racing for a seq: the
        unique index refuses one, which takes the next."""
        from sqlalchemy.exc import IntegrityError

        for attempt in range(3):
            try:
                async with self._tx() as conn:
                    low = (await conn.execute(select(func.min(messages.c.seq)).where(
                        messages.c.conversation_id == conversation_id, messages.c.seq < 0))).scalar()
                    seq = min(int(low or 0), 0) - 1
                    full = {**_MSG_DEFAULTS, **row, "id": row.get("id") or new_id(), "conversation_id": conversation_id,
                            "seq": seq}
                    await conn.execute(insert(messages).values(**full))
                    remote = (await conn.execute(select(_c.remote).where(_c.id == conversation_id))).scalar()
                    marked = {**(remote or {}), SUMMARY_MARK: seq}
                    await conn.execute(update(conversations).where(_c.id == conversation_id).values(remote=marked))
                return full
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def list_messages(
        self, conversation_id: str, *, before_seq: int | None = None, limit: int = 100,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest `limit` messages older than `before_seq`, returned oldest first (turns only: no summaries)."""
        conds = [messages.c.conversation_id == conversation_id, messages.c.seq > 0]
        if before_seq is not None:
            conds.append(messages.c.seq < before_seq)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(messages).where(*conds).order_by(messages.c.seq.desc()).limit(limit + 1)
            )).mappings().all()
        out = [dict(r) for r in rows[:limit]]
        out.reverse()
        await self._repair(conversation_id, out)
        return out, len(rows) > limit

    async def turns_page(
        self, conversation_id: str, *, first_id: str | None, limit: int,
    ) -> tuple[list[tuple[dict[str, Any] | None, dict[str, Any]]], bool]:
        """Dify-style paging: (user message, assistant message) pairs, newest page first."""
        conds = [messages.c.conversation_id == conversation_id, messages.c.role == "assistant"]
        async with self.engine.connect() as conn:
            if first_id:
                seq = (await conn.execute(select(messages.c.seq).where(
                    messages.c.id == first_id, messages.c.conversation_id == conversation_id,
                    messages.c.seq > 0))).scalar()
                if seq is None:
                    raise NotFoundError("First Message Not Exists.")
                conds.append(messages.c.seq < seq)
            answers = [dict(r) for r in (await conn.execute(
                select(messages).where(*conds).order_by(messages.c.seq.desc()).limit(limit + 1)
            )).mappings().all()]
            has_more = len(answers) > limit
            answers = answers[:limit]
            parent_ids = [a["parent_id"] for a in answers if a.get("parent_id")]
            parents: dict[str, dict[str, Any]] = {}
            if parent_ids:
                for r in (await conn.execute(select(messages).where(messages.c.id.in_(parent_ids)))).mappings():
                    parents[r["id"]] = dict(r)
        answers.reverse()
        await self._repair(conversation_id, answers)
        return [(parents.get(a.get("parent_id") or ""), a) for a in answers], has_more

    async def find_by_history(self, *, app: str, user: str, history_hash: str) -> str | None:
        """The newest conversation of (app, user) whose messages hash to `history_hash` (an index seek)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(conversations.c.id)
                .where(conversations.c.app == app, conversations.c.user == user,
                       conversations.c.history_hash == history_hash, conversations.c.deleted.is_(False),
                       conversations.c.scratch.is_(False))
                .order_by(conversations.c.updated_at.desc()).limit(1))).first()
        return str(row[0]) if row else None

    async def branch(self, conversation_id: str, tip_id: str | None = None) -> list[dict[str, Any]]:
        """The messages from the first to `tip_id` (default: the newest message), oldest first,
        following parents: a message's parent is its `parent_id` (an answer's question; a question
        continuing an older answer), else the message just before it. UUID_NIL as a question's
        parent starts a branch at the root. Reads the whole conversation: only forked conversations
        come here; a linear one is read by seq ranges as before. Summaries (seq < 0) are on no branch."""
        async with self.engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(
                select(messages).where(messages.c.conversation_id == conversation_id, messages.c.seq > 0)
                .order_by(messages.c.seq.asc())
            )).mappings().all()]
        if not rows:
            return []
        by_id = {r["id"]: r for r in rows}
        by_seq = {r["seq"]: r for r in rows}
        cur = by_id.get(tip_id) if tip_id else rows[-1]
        out: list[dict[str, Any]] = []
        while cur is not None:
            out.append(cur)
            parent = cur.get("parent_id")
            if parent == ROOT_PARENT:
                break
            cur = by_id.get(parent) if parent else by_seq.get(cur["seq"] - 1)
        out.reverse()
        await self._repair(conversation_id, out)
        return out

    async def message_with_owner(self, message_id: str) -> dict[str, Any] | None:
        """A message of a live conversation, with the conversation's app, user, last_seq and forked
        as `_app`, `_user`, `_last_seq`, `_forked`, in one read (a response's owner check on the
        OpenAI-style surfaces; a turn's check of the answer it continues)."""
        if self.hot is not None:
            read, hot = self.hot.read_message_owner(message_id)
            if read:
                return hot
        async with self.engine.connect() as conn:
            r = (await conn.execute(
                select(messages, conversations.c.app.label("_app"), conversations.c.user.label("_user"),
                       conversations.c.last_seq.label("_last_seq"), conversations.c.forked.label("_forked"))
                .join(conversations, conversations.c.id == messages.c.conversation_id)
                .where(messages.c.id == message_id, conversations.c.deleted.is_(False)))).mappings().first()
        return dict(r) if r else None

    async def app_feedbacks(self, *, app: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """The answers of `app`'s live conversations that carry a feedback, the latest rated first,
        each with its conversation's user as `_user`. (A feedback is a JSON object; an answer without
        one holds SQL NULL or JSON null, depending on the path that wrote it.)"""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(messages.c.id, messages.c.conversation_id, messages.c.feedback, messages.c.created_at,
                       messages.c.updated_at, conversations.c.user.label("_user"))
                .join(conversations, conversations.c.id == messages.c.conversation_id)
                .where(conversations.c.app == app, conversations.c.deleted.is_(False),
                       conversations.c.scratch.is_(False), messages.c.role == "assistant",
                       messages.c.feedback.is_not(None), cast(messages.c.feedback, Text).like("{%"))
                .order_by(messages.c.updated_at.desc(), messages.c.id.desc())
                .offset(offset).limit(limit))).mappings().all()
        return [dict(r) for r in rows]

    async def get_message(self, message_id: str) -> dict[str, Any] | None:
        if self.hot is not None:  # SQLite: a keyed read in the loop's thread (see SqliteHotPath.read_message)
            read, hot = self.hot.read_message(message_id)
            if read:
                return hot
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(messages).where(messages.c.id == message_id))).mappings().first()
        return dict(r) if r else None

    async def message_by_task(self, task_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(messages).where(messages.c.task_id == task_id))).mappings().first()
        return dict(r) if r else None

    @_durable
    async def request_stop(self, message_id: str) -> None:
        async with self._tx() as conn:
            await conn.execute(update(messages).where(messages.c.id == message_id, messages.c.status == "streaming")
                               .values(stop_requested=True))

    # ---- memory --------------------------------------------------------------------------------

    @_durable
    async def add_memory(self, *, app: str, user: str, text: str, token_estimate: int) -> dict[str, Any]:
        row = {"id": new_id(), "app": app, "user": user, "text": text, "token_estimate": token_estimate,
               "created_at": time.time()}
        try:
            async with self._tx() as conn:
                await conn.execute(insert(memories).values(**row))
        finally:
            self._memory_changed((app, user))
        return row

    async def list_memory(self, *, app: str, user: str) -> list[dict[str, Any]]:
        """Every stateless turn packs memory, so it is cached: changes made through this process show
        at once, another process's within about MEMORY_TTL. An expired entry still answers while one
        refresh runs in the background; every turn in flight re-reading it at once stalled them all."""
        key = (app, user)
        hit = self._memory_cache.get(key)
        if hit is None:
            rows = await asyncio.shield(self._memory_refresh(key))
        else:
            rows = hit[1]
            if hit[0] <= time.monotonic():
                self._memory_refresh(key)
        return [dict(r) for r in rows]

    def _memory_refresh(self, key: tuple[str, str]) -> asyncio.Task[list[dict[str, Any]]]:
        """The one read of `key`'s memory in flight, started if there is none."""
        task = self._memory_reads.get(key)
        if task is None:
            task = self._memory_reads[key] = asyncio.get_running_loop().create_task(self._read_memory(key))
        return task

    async def _read_memory(self, key: tuple[str, str]) -> list[dict[str, Any]]:
        generation = self._memory_generation
        try:
            async with self.engine.connect() as conn:
                rows = [dict(r) for r in
                        (await conn.execute(_MEMORY, {"b_app": key[0], "b_user": key[1]})).mappings().all()]
        finally:
            self._memory_reads.pop(key, None)
        if generation == self._memory_generation:  # no local change since the read began: cache it
            if len(self._memory_cache) > 10_000:
                self._memory_cache.clear()
            self._memory_cache[key] = (time.monotonic() + MEMORY_TTL, rows)
        return rows

    def _memory_changed(self, key: tuple[str, str]) -> None:
        self._memory_cache.pop(key, None)
        self._memory_generation += 1

    @_durable
    async def delete_memory(self, memory_id: str, *, app: str, user: str) -> None:
        try:
            async with self._tx() as conn:
                res = await conn.execute(delete(memories).where(memories.c.id == memory_id, memories.c.app == app,
                                                                memories.c.user == user))
        finally:
            self._memory_changed((app, user))
        if res.rowcount == 0:
            raise NotFoundError("Memory Not Exists.")

    # ---- files ---------------------------------------------------------------------------------

    @_durable
    async def add_file(self, *, app: str, user: str, name: str, data: bytes, mime_type: str, extension: str) -> dict[str, Any]:
        row = {"id": new_id(), "app": app, "user": user, "name": name, "size": len(data), "extension": extension,
               "mime_type": mime_type, "data": data, "remote": {}, "created_at": time.time()}
        async with self._tx() as conn:
            await conn.execute(insert(files).values(**row))
        return row

    async def get_file(self, file_id: str, *, app: str | None, user: str | None) -> dict[str, Any]:
        conds = [files.c.id == file_id]
        if app is not None:
            conds.append(files.c.app == app)
        if user is not None:
            conds.append(files.c.user == user)
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(files).where(*conds))).mappings().first()
        if r is None:
            raise NotFoundError("File Not Exists.")
        return dict(r)

    # ---- the deployment's secrets ------------------------------------------------------------

    @_durable
    async def server_secret(self, name: str, make: Callable[[], str]) -> str:
        """The deployment's secret `name`, made by `make` the first time any process asks. Two
        processes asking at once both try to insert; the loser reads the winner's, so all agree."""
        async with self.engine.connect() as conn:
            value = (await conn.execute(select(server_secrets.c.value).where(
                server_secrets.c.name == name))).scalar_one_or_none()
        if value is not None:
            return str(value)
        try:
            async with self._tx() as conn:
                await conn.execute(insert(server_secrets).values(name=name, value=make(), created_at=time.time()))
        except IntegrityError:
            pass  # another process made it first: theirs is the one
        async with self.engine.connect() as conn:
            return str((await conn.execute(select(server_secrets.c.value).where(
                server_secrets.c.name == name))).scalar_one())

    # ---- api keys ------------------------------------------------------------------------------

    @_durable
    async def add_key(self, *, app: str, key_hash: str, prefix: str,
                      columns: dict[str, Any] | None = None) -> dict[str, Any]:
        """`columns`: more of the key's columns (its limits)."""
        row = {"id": new_id(), "app": app, "key_hash": key_hash, "prefix": prefix, "created_at": time.time(),
               "revoked": False, **(columns or {})}
        async with self._tx() as conn:
            await conn.execute(insert(api_keys).values(**row))
        return row

    async def find_key(self, key_hash: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash,
                                                           api_keys.c.revoked.is_(False)))).mappings().first()
        return dict(r) if r else None

    async def list_keys(self, app: str | None = None) -> list[dict[str, Any]]:
        q = select(api_keys).order_by(api_keys.c.created_at)
        if app:
            q = q.where(api_keys.c.app == app)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(q)).mappings().all()]

    @_durable
    async def revoke_key(self, key_id_or_prefix: str) -> int:
        async with self._tx() as conn:
            res = await conn.execute(update(api_keys).where(
                or_(api_keys.c.id == key_id_or_prefix, api_keys.c.prefix == key_id_or_prefix)).values(revoked=True))
        return res.rowcount
