"""App keys: random secrets shown once, stored as SHA-256 hashes; a key selects an app.

Looking a key up costs a database read, so each server process remembers answers for KEY_TTL
seconds: a revoked key is refused within that time in every process (they all read the same
store), and a busy key costs one read per process per KEY_TTL, whatever the request rate."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..limits import Limits
from ..store import Store

KEY_TTL = 0.5  # seconds an answer (valid, unknown or revoked) is reused; revocation is seen within it
KEY_CACHE_SIZE = 10_000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "app-" + secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    app: str
    limits: Limits | None = None  # set at creation, never changed


KeyListener = Callable[[str, Limits | None], None]


class KeyCache:
    """Key lookups with a short memory; concurrent requests with the same key share one read."""

    def __init__(self, store: Store, ttl: float = KEY_TTL, on_read: KeyListener | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.on_read = on_read  # told each key's limits as they are read (the gateway's limiter)
        self._hits: dict[str, tuple[float, KeyRecord | None]] = {}
        self._reads: dict[str, asyncio.Task[KeyRecord | None]] = {}

    async def lookup(self, token: str) -> KeyRecord | None:
        digest = hash_key(token)
        hit = self._hits.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        task = self._reads.get(digest)
        if task is None:
            task = self._reads[digest] = asyncio.get_running_loop().create_task(self._read(digest))
        return await asyncio.shield(task)

    async def _read(self, digest: str) -> KeyRecord | None:
        try:
            row = await self.store.find_key(digest)
        finally:
            self._reads.pop(digest, None)
        record = KeyRecord(row["id"], row["app"], Limits.from_key_row(row)) if row else None
        if record is not None and self.on_read is not None:
            self.on_read(record.id, record.limits)
        if len(self._hits) >= KEY_CACHE_SIZE:
            now = time.monotonic()
            self._hits = {k: v for k, v in self._hits.items() if v[0] > now}
            if len(self._hits) >= KEY_CACHE_SIZE:
                self._hits.clear()
        self._hits[digest] = (time.monotonic() + self.ttl, record)
        return record


async def _with_store(settings: Settings) -> Store:
    store = Store(settings.database_url)
    await store.migrate()
    return store


async def create_key(settings: Settings, app: str, limits: Limits | None = None) -> str:
    """A new key for `app`, with its own limits if given (limits.parse_limits validates them)."""
    store = await _with_store(settings)
    try:
        key = new_key()
        await store.add_key(app=app, key_hash=hash_key(key), prefix=key[:10],
                            columns=limits.key_columns() if limits else None)
        return key
    finally:
        await store.close()


async def list_keys(settings: Settings) -> list[dict[str, Any]]:
    store = await _with_store(settings)
    try:
        return await store.list_keys()
    finally:
        await store.close()


async def revoke_key(settings: Settings, key_id: str) -> int:
    store = await _with_store(settings)
    try:
        return await store.revoke_key(key_id)
    finally:
        await store.close()
