"""Short turn leases: an index of the leases in use, and answers the old 15-minute leases left behind.

A turn's lease now lasts seconds and is renewed while the turn runs; the sweep that closes answers
left `streaming` by a dead process looks up expired leases through a partial index that holds only
leases in use (NULL `lock_until` rows are left out, so it stays a few entries long).

Answers the old code left `streaming` are closed here, once, as failed with the code `interrupted`
(their text stays): those with a later turn after them (turns of a conversation run one at a time,
so nothing is still writing them), and the last of a conversation whose lease is free or expired.

Revision ID: 0003
Revises: 0002
"""

import time

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

INTERRUPTED = {
    "code": "interrupted", "status": 500, "retryable": True,
    "message": "The answer was cut off: the server writing it stopped before it finished. The text that came "
               "before is kept.",
}


def upgrade() -> None:
    op.create_index("ix_conv_lease", "conversations", ["lock_until"],
                    sqlite_where=sa.text("lock_until IS NOT NULL"), postgresql_where=sa.text("lock_until IS NOT NULL"))
    op.get_bind().execute(
        sa.text(
            "UPDATE messages SET status = 'failed', error = :error, updated_at = :now "
            "WHERE status = 'streaming' AND EXISTS (SELECT 1 FROM conversations c WHERE c.id = messages.conversation_id "
            "AND (messages.seq < c.last_seq OR c.lock_until IS NULL OR c.lock_until < :now))"
        ).bindparams(sa.bindparam("error", type_=sa.JSON)),
        {"error": INTERRUPTED, "now": time.time()},
    )


def downgrade() -> None:
    op.drop_index("ix_conv_lease", table_name="conversations")
