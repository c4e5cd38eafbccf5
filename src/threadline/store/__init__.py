"""Persistence for conversations, messages, memory, files and keys (SQLite or PostgreSQL)."""

from .store import Store, new_id

__all__ = ["Store", "new_id"]
