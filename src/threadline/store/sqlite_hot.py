"""A turn's writes on SQLite, run on a plain `sqlite3` connection in the event loop's own thread.

Why: through SQLAlchemy's async adapter every statement costs a greenlet switch and a hop to
aiosqlite's worker thread and back; profiles put that at about a third of a turn's CPU. Writing two
rows to a WAL-mode database with `synchronous=NORMAL` never syncs the disk and takes tens of
microseconds, less than the hops around it. So the turn's three writes (start, claim, finish) run
here, under the store's in-process writer lock, and never wait on the loop:

- another process holding SQLite's write lock makes a call raise `Busy` at once (busy_timeout=0);
  the store retries briefly, then runs the same write on its async path, which waits in a thread;
- WAL checkpoints, which do sync, are switched off on this connection and run in a thread instead.

Rows written here are the rows SQLAlchemy would write: JSON columns are serialised the same way
(Python None becomes JSON `null`), so every reader sees one format.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from sqlalchemy import JSON, Boolean, Table

from .schema import conversations, messages

CHECKPOINT_EVERY = 256  # commits between WAL checkpoints (each commit adds a handful of pages)


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


def _dump(value: Any) -> str:
    return orjson.dumps(value).decode()


def _message_params(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(_dump(row[c]) if c in _MSG_JSON else row[c] for c in _MSG_COLS)


def _conversation_row(values: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(_CONV_COLS, values, strict=True))
    for c in _CONV_JSON:
        if out[c] is not None:
            out[c] = orjson.loads(out[c])
    for c in _CONV_BOOL:
        out[c] = bool(out[c])
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
        self._updates: dict[tuple[str, tuple[str, ...]], str] = {}
        self._commits = 0
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()
        self._closed = False

    # ---- transactions ------------------------------------------------------------------------------

    def _begin(self) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise Busy from None
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: rolled back on any error, committed otherwise (unless the body
        already rolled back, as a refused claim does)."""
        self._begin()
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        if self.conn.in_transaction:
            self._commit()

    def _commit(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()  # never leave the connection inside a transaction
            raise
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0 and self._checkpoint_task is None:
            self._checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint_cycle())

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    async def _checkpoint_cycle(self) -> None:
        """Two PASSIVE checkpoints in a worker thread. The first copies the bulk of the WAL while
        turns go on writing; the second, with this process's writers held back (they wait on the
        asyncio lock, the loop does not), copies the few frames written meanwhile. Only a fully
        copied WAL is rewound by the next writer; without the second step a busy server would never
        reach that point and the WAL file would grow without end."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._checkpoint)
            async with self.write_lock:
                await loop.run_in_executor(None, self._checkpoint)
        finally:
            self._checkpoint_task = None

    def _checkpoint(self) -> None:
        with self._checkpoint_lock:
            if self._closed:
                return
            try:
                if self._checkpoint_conn is None:
                    self._checkpoint_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
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

    # ---- the turn's writes (same contracts as the Store methods of the same names) -------------------

    def begin_turn(self, rows: list[dict[str, Any]], new_conversation: dict[str, Any] | None) -> None:
        with self._transaction():
            if new_conversation is not None:
                self.conn.execute(_INSERT_CONVERSATION, tuple(
                    _dump(new_conversation[c]) if c in _CONV_JSON else new_conversation[c] for c in _CONV_COLS))
            self.conn.executemany(_INSERT_MESSAGE, [_message_params(r) for r in rows])

    def claim(self, params: dict[str, Any],
              rows_for: Callable[[int], list[dict[str, Any]]]) -> dict[str, Any] | bool | None:
        """Take the lease and write the turn's rows (`rows_for(seq before the turn)`) in one
        transaction. Returns the claimed conversation; None while another turn holds the lease;
        False when the conversation is missing, deleted or someone else's."""
        with self._transaction():
            row = self.conn.execute(_CLAIM, params).fetchone()
            if row is None:
                found = self.conn.execute(_EXISTS, (params["id"], params["user"], params["app"])).fetchone()
                self._rollback()
                return None if found else False
            conv = _conversation_row(row)
            self.conn.executemany(_INSERT_MESSAGE, [_message_params(r) for r in rows_for(conv["last_seq"] - 2)])
        return conv

    def _update_sql(self, table: str, cols: tuple[str, ...]) -> str:
        sql = self._updates.get((table, cols))
        if sql is None:
            sql = f"UPDATE {table} SET {', '.join(f'{_q(c)} = ?' for c in cols)} WHERE id = ?"
            self._updates[(table, cols)] = sql
        return sql

    def finish_turn(self, conversation_id: str, message_id: str, conversation_values: dict[str, Any],
                    message_values: dict[str, Any]) -> None:
        with self._transaction():
            for table, json_cols, values, key in (("messages", _MSG_JSON, message_values, message_id),
                                                   ("conversations", _CONV_JSON, conversation_values, conversation_id)):
                cols = tuple(values)
                self.conn.execute(self._update_sql(table, cols),
                                  (*(_dump(values[c]) if c in json_cols else values[c] for c in cols), key))
