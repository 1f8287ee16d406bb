"""A reply's lifecycle in the database: its status, its Discord parts, whether Discord shows
its final state yet; and which conversations are DMs (for back-filling after a restart).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("reply_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("reply_to", sa.String(64), nullable=True))
        batch.add_column(sa.Column("requester_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("part_ids", sa.Text(), nullable=True))
        batch.add_column(sa.Column("notice", sa.Text(), nullable=True))
        batch.add_column(sa.Column("undelivered", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_messages_reply_status", "messages", ["reply_status"])
    op.create_index("ix_messages_undelivered", "messages", ["undelivered"])
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("is_dm", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("is_dm")
    op.drop_index("ix_messages_undelivered", table_name="messages")
    op.drop_index("ix_messages_reply_status", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        for column in ("undelivered", "notice", "part_ids", "requester_id", "reply_to", "reply_status"):
            batch.drop_column(column)
