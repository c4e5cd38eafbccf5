"""Tables. SQLAlchemy Core (not the ORM): the hot path is a handful of keyed reads and writes, and
Core keeps them cheap. Times are float epoch seconds: sortable, portable across SQLite and PostgreSQL,
and finer than Dify's 1-second resolution (which makes its own paging skip messages).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("app", String(128), nullable=False),
    Column("user", String(255), nullable=False),
    Column("engine", String(128), nullable=False),
    Column("name", Text, nullable=False, default=""),
    Column("inputs", JSON, nullable=False, default=dict),
    # {engine_name: {"id": remote conversation id, "seq": last local seq the remote has seen}}
    Column("remote", JSON, nullable=False, default=dict),
    Column("last_seq", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    # True once a turn continued from an older message: messages then form a tree (see Store.branch).
    Column("forked", Boolean, nullable=False, default=False, server_default=false()),
    # turns.history_hash over the current branch's messages: finds the conversation an OpenAI client's
    # resent history continues, by index (ix_conv_history).
    Column("history_hash", String(48), nullable=True),
    Column("lock_owner", String(64), nullable=True),
    Column("lock_until", Float, nullable=True),
    Column("meta", JSON, nullable=True),  # the Conversations API's string pairs; see migration 0005
    # A store: false response's conversation: hidden from matching and listing, removed after; see 0005.
    Column("scratch", Boolean, nullable=False, default=False, server_default=false()),
)
Index("ix_conv_owner_updated", conversations.c.app, conversations.c.user, conversations.c.updated_at)
Index("ix_conv_owner_created", conversations.c.app, conversations.c.user, conversations.c.created_at)
Index("ix_conv_history", conversations.c.app, conversations.c.user, conversations.c.history_hash)
# Only leases in use (a few per running turn): the sweep for expired ones reads this, not the table.
Index("ix_conv_lease", conversations.c.lock_until, sqlite_where=conversations.c.lock_until.is_not(None),
      postgresql_where=conversations.c.lock_until.is_not(None))

messages = Table(
    "messages",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("conversation_id", String(36), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False, default=""),
    Column("parts", JSON, nullable=True),  # typed items: images, function calls/results, reasoning state
    Column("reasoning", Text, nullable=True),
    Column("status", String(16), nullable=False),  # completed | streaming | stopped | failed
    Column("error", JSON, nullable=True),
    Column("usage", JSON, nullable=True),
    Column("price", JSON, nullable=True),
    Column("engine", String(128), nullable=True),
    Column("model", String(255), nullable=True),
    Column("token_estimate", Integer, nullable=False, default=0),
    Column("parent_id", String(36), nullable=True),  # assistant → the user message it answers
    Column("task_id", String(36), nullable=True),
    Column("remote_id", String(255), nullable=True),
    Column("inputs", JSON, nullable=True),
    Column("feedback", JSON, nullable=True),
    Column("latency", Float, nullable=True),
    Column("finish_reason", String(32), nullable=True),  # what the engine reported; see migration 0004
    Column("stop_requested", Boolean, nullable=False, default=False),
    # An answer made by POST /v1/responses: the request fields its Response echoes; see migration 0005.
    Column("response", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
Index("ix_msg_conv_seq", messages.c.conversation_id, messages.c.seq, unique=True)
Index("ix_msg_task", messages.c.task_id)

memories = Table(
    "memories",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("app", String(128), nullable=False),
    Column("user", String(255), nullable=False),
    Column("text", Text, nullable=False),
    Column("token_estimate", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
)
Index("ix_mem_owner", memories.c.app, memories.c.user, memories.c.created_at)

files = Table(
    "files",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("app", String(128), nullable=False),
    Column("user", String(255), nullable=False),
    Column("name", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("extension", String(32), nullable=False),
    Column("mime_type", String(128), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("remote", JSON, nullable=False, default=dict),  # {engine_name: remote upload id}
    Column("created_at", Float, nullable=False),
)
Index("ix_files_owner", files.c.app, files.c.user)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("app", String(128), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    # Per-key limits, set when the key is created (`keys create --rpm ...`) and never changed after:
    # NULL = no limit. Spend is a decimal string in `limit_currency` (exact; SQLite has no decimal type).
    Column("limit_rpm", Integer, nullable=True),
    Column("limit_tokens_per_day", BigInteger, nullable=True),
    Column("limit_spend_per_day", String(32), nullable=True),
    Column("limit_currency", String(16), nullable=True),
)

# Usage of a limited scope ("key:<id>" or "app:<name>") on one UTC day (epoch days): the requests of
# its current minute (epoch minutes), and the tokens and spend (in nano-units of the limit's
# currency, so sums are exact integers) of the day. One row per scope per day, updated in place.
usage_counters = Table(
    "usage_counters",
    metadata,
    Column("scope", String(200), primary_key=True),
    Column("day", Integer, primary_key=True),
    Column("minute", Integer, nullable=False),
    Column("requests", Integer, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("spend", BigInteger, nullable=False),
    sqlite_with_rowid=False,  # the key is the table: one B-tree to write instead of two (WAL per turn halved)
)

# One row per running turn of an app with a per-user concurrency limit. The process running the turn
# renews `expires_at`; a crashed process's rows expire and stop counting.
turn_slots = Table(
    "turn_slots",
    metadata,
    Column("app", String(128), primary_key=True),
    Column("user", String(255), primary_key=True),
    Column("id", String(36), primary_key=True),
    Column("expires_at", Float, nullable=False),
    sqlite_with_rowid=False,  # keyed by (app, user) first: a user's running turns are one range
)

# A deployment's own secrets, made once and shared by all its processes: "file_url" signs the file
# URLs the server hands out (server/signed_files.py) when [server] file_secret is not configured.
server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)
