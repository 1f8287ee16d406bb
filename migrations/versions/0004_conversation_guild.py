"""The server a conversation belongs to, so that removing the bot from a server deletes
that server's history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("guild_id", sa.String(32), nullable=True))
    op.create_index("ix_conversations_guild_id", "conversations", ["guild_id"])
    op.create_index("ix_messages_created_at", "messages", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_messages_created_at", table_name="messages")
    op.drop_index("ix_conversations_guild_id", table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("guild_id")
