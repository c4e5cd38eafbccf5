"""A deployment's own secrets, made once and shared by every process of it: `server_secrets`.

The first is "file_url", the HMAC key of the signed file URLs (`/files/<id>/file-preview?timestamp=
&nonce=&sign=`) when `[server] file_secret` is not configured: a process that made its own key would
refuse the URLs another process signed.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("server_secrets")
