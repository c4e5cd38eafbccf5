"""Conversation items and branches: the finish reason each answer ended with, and whether a
conversation's messages form a tree.

Function calls, function results and opaque reasoning state live in `messages.parts` beside images
(typed JSON items, see messages.items_to_json), so they need no column of their own; rows written
before this revision hold image parts only and read back unchanged. `finish_reason` is what the
engine reported (stop | length | tool_calls | content_filter); older rows have NULL and surfaces
derive it from the status, as the previous release did.

`conversations.forked` is false for every existing conversation (they are linear): a message's
parent is then the one before it, as the previous release read them. It becomes true when a turn
continues from an older message (regenerate, edit-and-resend, continue from there).

A plain ALTER TABLE ... ADD COLUMN on both databases: SQLite's batch mode would copy the table,
and dropping the old copy cascaded to every message once (ON DELETE CASCADE), so it is never used.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("finish_reason", sa.String(32), nullable=True))
    op.add_column("conversations", sa.Column("forked", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("conversations", "forked")
    op.drop_column("messages", "finish_reason")
