"""Rate limits and budgets: per-key limit columns, usage counters, running-turn slots.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns with no default: existing keys keep working, with no limits.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("limit_rpm", sa.Integer, nullable=True))
        batch.add_column(sa.Column("limit_tokens_per_day", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("limit_spend_per_day", sa.String(32), nullable=True))
        batch.add_column(sa.Column("limit_currency", sa.String(16), nullable=True))
    op.create_table(
        "usage_counters",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("day", sa.Integer, primary_key=True),
        sa.Column("minute", sa.Integer, nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("spend", sa.BigInteger, nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "turn_slots",
        sa.Column("app", sa.String(128), primary_key=True),
        sa.Column("user", sa.String(255), primary_key=True),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("turn_slots")
    op.drop_table("usage_counters")
    with op.batch_alter_table("api_keys") as batch:
        for c in ("limit_currency", "limit_spend_per_day", "limit_tokens_per_day", "limit_rpm"):
            batch.drop_column(c)
