"""A turn's writes on SQLite, run on a plain `sqlite3` connection in the event loop's own thread,
committed in groups.

Why: through SQLAlchemy's async adapter every statement costs a greenlet switch and a hop to
aiosqlite's worker thread and back; profiles put that at about a third of a turn's CPU. Writing two
rows to a WAL-mode database with `synchronous=NORMAL` never syncs the disk and takes tens of
microseconds, less than the hops around it. So a turn's writes (start or claim, then finish) run
here, under the store's in-process writer lock, and never wait on the loop:

- writes are group-committed: each caller queues its write and awaits it, and every write queued
  during one pass of the event loop runs in one transaction. The COMMIT (WAL frames and index
  updates) was the dearest statement of a turn, and busy servers have several turns to write at
  once; a write that fails is replayed alone so it fails alone;
- another process holding SQLite's write lock makes BEGIN fail at once (busy_timeout=0); the group
  polls for the lock on the loop (see HOT_WAIT), and only if that takes long does every write in it
  answer GAVE_UP and run on the store's async path, which waits in a thread;
- WAL checkpoints, which copy pages and sync, are switched off on this connection and run in a
  thread instead (see _checkpoint).

Rows written here are the rows SQLAlchemy would write: JSON columns are serialised the same way
(Python None becomes JSON `null`), so every reader sees one format.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from sqlalchemy import JSON, Boolean, Table

from .schema import conversations, messages

CHECKPOINT_EVERY = 1024  # writes between WAL checkpoints (each write adds a handful of pages)
WAL_RESET_BYTES = 64 * 1024 * 1024  # a WAL this large is started over (see _checkpoint)
CATCH_UP_FRAMES = 256  # uncopied frames few enough (about 1 MB) to copy with writers held back
RESTART_WAIT_MS = 250  # how long the RESTART checkpoint waits for writers and readers to step aside
# While another process holds SQLite's write lock, a group polls for it (a refused BEGIN costs
# microseconds, and the other process's writes take a fraction of a millisecond) for up to HOT_WAIT
# seconds before it falls back to the async path. Falling back after a few milliseconds handed busy
# turns to SQLite's own busy handler, whose sleeps grow to 100 ms: tail latency of two processes.
HOT_WAIT = 1.0
HOT_POLL = 0.001
GAVE_UP = object()  # a write's answer when it must run on the store's async path instead
T = TypeVar("T")


class Busy(Exception):
    """Another process holds SQLite's write lock; the caller retries on its waiting path."""


def _columns(table: Table) -> tuple[list[str], set[str], set[str]]:
    cols = [c.name for c in table.columns]
    json_cols = {c.name for c in table.columns if isinstance(c.type, JSON)}
    bool_cols = {c.name for c in table.columns if isinstance(c.type, Boolean)}
    return cols, json_cols, bool_cols


_CONV_COLS, _CONV_JSON, _CONV_BOOL = _columns(conversations)
_MSG_COLS, _MSG_JSON, _ = _columns(messages)


def _q(name: str) -> str:
    return f'"{name}"'


_INSERT_MESSAGE = f"INSERT INTO messages ({', '.join(map(_q, _MSG_COLS))}) VALUES ({', '.join('?' * len(_MSG_COLS))})"
_INSERT_CONVERSATION = (f"INSERT INTO conversations ({', '.join(map(_q, _CONV_COLS))}) "
                        f"VALUES ({', '.join('?' * len(_CONV_COLS))})")
# The same claim as Store._CLAIM: owner check, free lease, two seqs, in one statement.
_CLAIM = (
    'UPDATE conversations SET last_seq = last_seq + 2, updated_at = :now, lock_owner = :owner, lock_until = :until '
    'WHERE id = :id AND "user" = :user AND app = :app AND deleted = 0 '
    'AND (lock_until IS NULL OR lock_until < :now OR lock_owner = :owner) '
    f"RETURNING {', '.join(map(_q, _CONV_COLS))}"
)
_EXISTS = 'SELECT 1 FROM conversations WHERE id = ? AND "user" = ? AND app = ? AND deleted = 0'
# The same as Store._CLOSE_PREVIOUS: the claimed conversation's previous answer, if its turn died.
_CLOSE_PREVIOUS = ("UPDATE messages SET status = 'failed', error = ?, updated_at = ? "
                   "WHERE conversation_id = ? AND seq = ? AND status = 'streaming'")
# The same as Store._FINISH_CONVERSATION: the lease is freed only by its holder.
_RELEASE = (", lock_owner = CASE WHEN lock_owner = ? THEN NULL ELSE lock_owner END"
            ", lock_until = CASE WHEN lock_owner = ? THEN NULL ELSE lock_until END")
RENEW_CHUNK = 500  # ids per renewal statement (SQLite allows 32766 variables)


def _dump(value: Any) -> str:
    return "null" if value is None else orjson.dumps(value).decode()  # most JSON columns of a turn are empty


_MSG_IS_JSON = tuple(c in _MSG_JSON for c in _MSG_COLS)


def _message_params(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(_dump(row[c]) if j else row[c] for c, j in zip(_MSG_COLS, _MSG_IS_JSON, strict=True))


def _conversation_row(values: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(_CONV_COLS, values, strict=True))
    for c in _CONV_JSON:
        if out[c] is not None:
            out[c] = orjson.loads(out[c])
    for c in _CONV_BOOL:
        out[c] = bool(out[c])
    return out


_MSG_BOOL = {c.name for c in messages.columns if isinstance(c.type, Boolean)}
_SELECT_MESSAGE = f"SELECT {', '.join(map(_q, _MSG_COLS))} FROM messages WHERE id = ?"
_SELECT_MESSAGE_OWNER = (f"SELECT {', '.join('m.' + _q(c) for c in _MSG_COLS)}, c.app, c.\"user\", c.last_seq, c.forked "
                         "FROM messages m "
                         "JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ? AND c.deleted = 0")
_SELECT_CONVERSATION = f"SELECT {', '.join(map(_q, _CONV_COLS))} FROM conversations WHERE id = ? AND deleted = 0"


def _message_row(values: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(_MSG_COLS, values, strict=True))
    for c in _MSG_JSON:
        if out[c] is not None:
            out[c] = orjson.loads(out[c])
    for c in _MSG_BOOL:
        out[c] = bool(out[c])
    return out


def _owned_message_row(values: tuple[Any, ...]) -> dict[str, Any]:
    out = _message_row(values[:-4])
    out["_app"], out["_user"], out["_last_seq"], out["_forked"] = values[-4], values[-3], values[-2], bool(values[-1])
    return out


class SqliteHotPath:
    def __init__(self, path: str, write_lock: asyncio.Lock) -> None:
        self.path = path
        self.write_lock = write_lock  # the store's: every writer in this process queues on it
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=0")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._updates: dict[tuple[str, tuple[str, ...], bool], str] = {}
        self._writes = 0
        self._queue: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._restarting = False  # set by the checkpoint thread while a RESTART checkpoint runs
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()
        self._closed = False

    # ---- keyed reads ---------------------------------------------------------------------------------

    def read_message(self, message_id: str) -> tuple[bool, dict[str, Any] | None]:
        """One message by id, read on this connection in the loop's thread (tens of microseconds: a
        WAL read takes no lock, and no transaction of this connection is open between groups), as
        SQLAlchemy would return it: (True, row or None), or (False, None) when it cannot be read
        here now (the caller reads it on the async path)."""
        return self._read(_SELECT_MESSAGE, (message_id,), _message_row)

    def read_message_owner(self, message_id: str) -> tuple[bool, dict[str, Any] | None]:
        """One message of a live conversation, with that conversation's `app`, `user`, `last_seq`
        and `forked` (as `_app`, `_user`, `_last_seq`, `_forked`): an ownership check and the row in
        one read; see read_message."""
        return self._read(_SELECT_MESSAGE_OWNER, (message_id,), _owned_message_row)

    def read_conversation(self, conversation_id: str) -> tuple[bool, dict[str, Any] | None]:
        """One live (not deleted) conversation by id; see read_message."""
        return self._read(_SELECT_CONVERSATION, (conversation_id,), _conversation_row)

    def _read(self, sql: str, params: tuple[Any, ...],
              convert: Callable[[tuple[Any, ...]], dict[str, Any]]) -> tuple[bool, dict[str, Any] | None]:
        if self._closed or self.conn.in_transaction:
            return False, None
        try:
            row = self.conn.execute(sql, params).fetchone()
        except sqlite3.Error:
            return False, None
        return True, None if row is None else convert(row)

    # ---- group commit ------------------------------------------------------------------------------

    def write(self, body: Callable[[], T]) -> asyncio.Future[T | object]:
        """Queue `body` (statements on self.conn, no transaction control) for the next group commit;
        the future answers its result, its exception, or GAVE_UP when it must go the async way."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((body, fut))
        if self._flusher is None:
            # Starts on the loop's next pass: writes queued until then join this group.
            self._flusher = loop.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        try:
            async with self.write_lock:
                busy_since = 0.0
                while self._queue:
                    if self._restarting:  # the checkpoint thread is starting the WAL over: a moment
                        await asyncio.sleep(HOT_POLL)
                        continue
                    batch, self._queue = self._queue, []
                    if self._commit_group(batch):
                        busy_since = 0.0
                        continue
                    self._queue[:0] = batch  # another process is writing: wait a little, then try again
                    now = time.monotonic()
                    busy_since = busy_since or now
                    if now - busy_since > HOT_WAIT:
                        for _, fut in self._queue:
                            if not fut.done():
                                fut.set_result(GAVE_UP)
                        self._queue = []
                        break
                    await asyncio.sleep(HOT_POLL)
        finally:
            self._flusher = None

    def _commit_group(self, batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]]) -> bool:
        """Run a group in one transaction and settle its futures; False (nothing run) while another
        process holds SQLite's write lock."""
        live = [(body, fut) for body, fut in batch if not fut.done()]  # a caller already gone: skip its write
        if not live:
            return True
        try:
            self._begin()
        except Busy:
            return False
        except Exception as exc:  # no waiter may hang: each hears why
            for _, fut in live:
                fut.set_exception(exc)
            return True
        try:
            results = [body() for body, _ in live]
            self._commit(len(live))
        except Exception as exc:
            self._rollback()
            if len(live) == 1:
                live[0][1].set_exception(exc)
            else:
                self._one_by_one(live)
            return True
        for (_, fut), result in zip(live, results, strict=True):
            fut.set_result(result)
        return True

    def _one_by_one(self, live: list[tuple[Callable[[], Any], asyncio.Future[Any]]]) -> None:
        for write in live:
            if not self._commit_group([write]):  # another process took the lock meanwhile
                write[1].set_result(GAVE_UP)

    def _begin(self) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise Busy from None
            raise

    def _commit(self, writes: int) -> None:
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()  # never leave the connection inside a transaction
            raise
        before = self._writes
        self._writes += writes
        if self._writes // CHECKPOINT_EVERY != before // CHECKPOINT_EVERY and self._checkpoint_task is None:
            self._checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint_cycle())

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    async def _checkpoint_cycle(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._checkpoint)
        finally:
            self._checkpoint_task = None

    def _checkpoint(self) -> None:
        """In a worker thread: PASSIVE checkpoints copy the WAL into the database while turns go on
        writing. The WAL file is only started over by a writer that finds it fully copied, which a
        busy server never does (frames keep arriving during the copy), so it would grow without end;
        with several server processes, even a catch-up just before this process's next write loses
        the race to the others. So once the passes have left only a few frames and the file is large,
        a RESTART checkpoint copies those while holding every process's writers back (they poll for
        the lock, nobody's event loop waits), and the next write starts the WAL over."""
        with self._checkpoint_lock:
            if self._closed:
                return
            try:
                if self._checkpoint_conn is None:
                    self._checkpoint_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                    self._checkpoint_conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
                for _ in range(4):
                    _, frames, copied = self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames - copied <= CATCH_UP_FRAMES:
                        break
                size = os.stat(self.path + "-wal").st_size
                # Writing faster than the passes copy: wait for a later cycle, unless the file has grown
                # far past its bound; then hold writers for the longer copy rather than grow on.
                if size > WAL_RESET_BYTES and (frames - copied <= CATCH_UP_FRAMES or size > 2 * WAL_RESET_BYTES):
                    self._restarting = True  # this process's writers step aside (they poll, see _flush)
                    try:
                        self._checkpoint_conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                    finally:
                        self._restarting = False
            except (sqlite3.Error, OSError):
                pass  # the next cycle, or another connection's autocheckpoint, catches up

    def close(self) -> None:
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
        with self._checkpoint_lock:
            self._closed = True
            if self._checkpoint_conn is not None:
                self._checkpoint_conn.close()
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    # ---- the turn's writes: group-commit bodies (same contracts as the Store methods of the same names)

    def begin_turn(self, rows: list[dict[str, Any]], new_conversation: dict[str, Any] | None) -> None:
        if new_conversation is not None:
            self.conn.execute(_INSERT_CONVERSATION, tuple(
                _dump(new_conversation[c]) if c in _CONV_JSON else new_conversation[c] for c in _CONV_COLS))
        self.conn.executemany(_INSERT_MESSAGE, [_message_params(r) for r in rows])

    def claim(self, params: dict[str, Any], rows_for: Callable[[int], list[dict[str, Any]]],
              interrupted: dict[str, Any]) -> dict[str, Any] | bool | None:
        """Take the lease, close the previous answer if its turn died (as `interrupted`), and write
        the turn's rows (`rows_for(seq before the turn)`). Returns the claimed conversation; None
        while another turn holds the lease; False when the conversation is missing, deleted or
        someone else's (neither writes anything)."""
        row = self.conn.execute(_CLAIM, params).fetchone()
        if row is None:
            found = self.conn.execute(_EXISTS, (params["id"], params["user"], params["app"])).fetchone()
            return None if found else False
        conv = _conversation_row(row)
        seq = conv["last_seq"] - 2
        self.conn.execute(_CLOSE_PREVIOUS, (_dump(interrupted), params["now"], params["id"], seq))
        self.conn.executemany(_INSERT_MESSAGE, [_message_params(r) for r in rows_for(seq)])
        return conv

    def _update_sql(self, table: str, cols: tuple[str, ...], release: bool = False) -> str:
        sql = self._updates.get((table, cols, release))
        if sql is None:
            sql = (f"UPDATE {table} SET {', '.join(f'{_q(c)} = ?' for c in cols)}{_RELEASE if release else ''} "
                   "WHERE id = ?")
            self._updates[(table, cols, release)] = sql
        return sql

    def finish_turn(self, conversation_id: str, message_id: str, conversation_values: dict[str, Any],
                    message_values: dict[str, Any], lock_owner: str | None = None) -> None:
        cols = tuple(message_values)
        self.conn.execute(self._update_sql("messages", cols),
                          (*(_dump(message_values[c]) if c in _MSG_JSON else message_values[c] for c in cols),
                           message_id))
        cols = tuple(conversation_values)
        values = (_dump(conversation_values[c]) if c in _CONV_JSON else conversation_values[c] for c in cols)
        if lock_owner:
            self.conn.execute(self._update_sql("conversations", cols, True),
                              (*values, lock_owner, lock_owner, conversation_id))
        else:
            self.conn.execute(self._update_sql("conversations", cols), (*values, conversation_id))

    def renew(self, owner: str, conversation_ids: list[str], until: float) -> list[str]:
        """Extend the leases `owner` holds among `conversation_ids`; returns the ids extended."""
        renewed: list[str] = []
        for i in range(0, len(conversation_ids), RENEW_CHUNK):
            chunk = conversation_ids[i:i + RENEW_CHUNK]
            sql = (f"UPDATE conversations SET lock_until = ? WHERE lock_owner = ? AND id IN ({', '.join('?' * len(chunk))}) "
                   "RETURNING id")
            renewed.extend(r[0] for r in self.conn.execute(sql, (until, owner, *chunk)).fetchall())
        return renewed
