"""App keys: random secrets shown once, stored as SHA-256 hashes; a key selects an app."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from ..config import Settings
from ..store import Store


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "app-" + secrets.token_urlsafe(24)


async def _with_store(settings: Settings) -> Store:
    store = Store(settings.database_url)
    await store.migrate()
    return store


async def create_key(settings: Settings, app: str) -> str:
    store = await _with_store(settings)
    try:
        key = new_key()
        await store.add_key(app=app, key_hash=hash_key(key), prefix=key[:10])
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
