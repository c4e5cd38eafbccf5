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

`conversations.history_hash` (turns.history_hash over the conversation's messages) lets an OpenAI
client's resent history find its conversation through the index ix_conv_history instead of a scan
of the user's newest 50 conversations; it is computed here for every existing conversation.

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
    op.add_column("conversations", sa.Column("history_hash", sa.String(48), nullable=True))
    op.create_index("ix_conv_history", "conversations", ["app", "user", "history_hash"])
    _backfill_history_hashes()


def _backfill_history_hashes() -> None:
    """Every existing conversation (all linear) gets the hash of its messages, in seq order."""
    from threadline.turns import rows_hash

    bind = op.get_bind()
    conv = sa.table("conversations", sa.column("id", sa.String), sa.column("history_hash", sa.String))
    msgs = sa.table("messages", sa.column("conversation_id", sa.String), sa.column("seq", sa.Integer),
                    sa.column("role", sa.String), sa.column("content", sa.Text), sa.column("parts", sa.JSON))
    ids = [r[0] for r in bind.execute(sa.select(conv.c.id))]
    for cid in ids:
        rows = [dict(r) for r in bind.execute(sa.select(msgs.c.role, msgs.c.content, msgs.c.parts)
                            .where(msgs.c.conversation_id == cid).order_by(msgs.c.seq)).mappings()]
        bind.execute(sa.update(conv).where(conv.c.id == cid).values(history_hash=f"{len(rows)}:{rows_hash(rows)}"))


def downgrade() -> None:
    op.drop_index("ix_conv_history", table_name="conversations")
    op.drop_column("conversations", "history_hash")
    op.drop_column("conversations", "forked")
    op.drop_column("messages", "finish_reason")
