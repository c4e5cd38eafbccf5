"""Persistence for conversations, messages, memory, files and keys (SQLite or PostgreSQL)."""

from .store import INTERRUPTED, Store, new_id, settle

__all__ = ["INTERRUPTED", "Store", "new_id", "settle"]
