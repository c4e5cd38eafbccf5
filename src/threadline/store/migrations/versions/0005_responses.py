"""The OpenAI Responses and Conversations surfaces: what a response was asked, and a
conversation's metadata.

`messages.response` is held by an answer created through `POST /v1/responses`: the request fields
a Response object echoes (instructions, tools, tool_choice, sampling, text format, reasoning,
truncation, metadata, previous_response_id, store) and whether the response was deleted. A deleted
response is a marker, not a removal: its items stay in the conversation (later responses were
built on them, and OpenAI keeps a conversation's items when a response is deleted). NULL for every
answer made through another surface, which the Responses routes render with defaults.

`conversations.meta` is the Conversations API's map of up to 16 string pairs (NULL: none).

`conversations.scratch` marks the conversation a `store: false` response runs in: never matched by a
resent history, listed, or reached through the OpenAI surfaces, and removed when the response (or
its WebSocket) ends; a sweep removes any a crashed process left (see Gateway.sweep_scratch).

A plain ALTER TABLE ... ADD COLUMN on both databases (never SQLite's batch mode: see 0004).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("response", sa.JSON(), nullable=True))
    op.add_column("conversations", sa.Column("meta", sa.JSON(), nullable=True))
    op.add_column("conversations", sa.Column("scratch", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("conversations", "scratch")
    op.drop_column("conversations", "meta")
    op.drop_column("messages", "response")
