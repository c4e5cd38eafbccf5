"""Bulk-load stored history for the benchmark, straight into Threadline's schema.

Going through the gateway would take minutes for a million messages; the rows written here are the
same shape the gateway writes (seq per conversation, token estimates stored at write time).
SQLite gets plain executemany in one transaction; PostgreSQL gets COPY.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

from threadline.store import Store
from threadline.tokens import estimate_message

APP = "default"
TEXT_U = "Question {i}: how does the keyset paging in this store keep page latency flat as tables grow?"
TEXT_A = "Answer {i}: each page seeks an index on (conversation, seq) instead of counting rows it skips."
CONV_COLS = ("id", "app", "user", "engine", "name", "inputs", "remote", "last_seq", "created_at", "updated_at", "deleted")
MSG_COLS = ("id", "conversation_id", "seq", "role", "content", "status", "token_estimate", "engine", "model",
            "parent_id", "stop_requested", "created_at", "updated_at")
TOK_U = estimate_message(TEXT_U.format(i=12345))
TOK_A = estimate_message(TEXT_A.format(i=12345))


Row = tuple[Any, ...]


def _rows(conversations: list[tuple[str, str, int]], engine: str, t0: float) -> tuple[list[Row], Iterator[Row]]:
    """conversations: (id, user, n_messages). Messages are user/assistant pairs, oldest first."""
    convs = []
    for k, (cid, user, n) in enumerate(conversations):
        convs.append((cid, APP, user, engine, f"seeded {k}", "{}", "{}", n, t0 + k * 1e-3, t0 + k * 1e-3 + n * 1e-6, False))

    def msgs() -> Iterator[Row]:
        for k, (cid, _user, n) in enumerate(conversations):
            base = t0 + k * 1e-3
            parent = None
            for s in range(1, n + 1):
                mid = str(uuid.uuid4())
                if s % 2:
                    parent = mid
                    yield (mid, cid, s, "user", TEXT_U.format(i=s), "completed", TOK_U, engine, "bench", None, False,
                           base + s * 1e-6, base + s * 1e-6)
                else:
                    yield (mid, cid, s, "assistant", TEXT_A.format(i=s), "completed", TOK_A, engine, "bench", parent,
                           False, base + s * 1e-6, base + s * 1e-6)

    return convs, msgs()


async def seed(database_url: str, conversations: list[tuple[str, str, int]], engine: str = "bench") -> None:
    store = Store(database_url)
    await store.migrate()
    await store.close()
    convs, msgs = _rows(conversations, engine, time.time() - 86400)
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1]
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            db.executemany(f"INSERT INTO conversations ({','.join(CONV_COLS)}) VALUES ({','.join('?' * len(CONV_COLS))})",
                           convs)
            db.executemany(f"INSERT INTO messages ({','.join(MSG_COLS)}) VALUES ({','.join('?' * len(MSG_COLS))})", msgs)
        db.execute("ANALYZE")
        db.close()
        return
    import asyncpg

    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.copy_records_to_table("conversations", records=convs, columns=CONV_COLS)
        batch: list[tuple[Any, ...]] = []
        for row in msgs:
            batch.append(row)
            if len(batch) >= 50_000:
                await conn.copy_records_to_table("messages", records=batch, columns=MSG_COLS)
                batch = []
        if batch:
            await conn.copy_records_to_table("messages", records=batch, columns=MSG_COLS)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def fresh_postgres(name: str) -> str:
    """A new empty database on the local server; returns its SQLAlchemy URL."""
    import asyncpg

    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def plan_store_scale(n_conversations: int, n_messages: int, users: int) -> list[tuple[str, str, int]]:
    """Spread messages evenly; user u0 owns the conversation pages the benchmark reads, and one
    conversation is long (10% of all messages) so message pages are read deep in a big thread."""
    long_n = n_messages // 10
    per = max(2, (n_messages - long_n) // max(1, n_conversations - 1) // 2 * 2)
    plan = [(str(uuid.uuid4()), f"u{k % users}", per) for k in range(n_conversations - 1)]
    plan.append((str(uuid.uuid4()), "u0", long_n // 2 * 2))
    return plan


if __name__ == "__main__":  # manual check: python bench/seed.py
    import tempfile

    d = tempfile.mkdtemp()
    t = time.perf_counter()
    asyncio.run(seed(f"sqlite+aiosqlite:///{d}/x.db", plan_store_scale(1000, 10_000, 10)))
    print(f"seeded 10k messages in {time.perf_counter() - t:.2f}s")
