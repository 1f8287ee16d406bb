"""Roleplay: scenes (several characters in a channel), swipes (a reply's alternatives),
continue, user personas, text attachments as context, a rolling memory per conversation,
when to speak, the author's note, and channels opted in to training-data export.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
CONVERSATION_COLUMNS = [
    sa.Column("scene_strategy", sa.String(16), nullable=True),
    sa.Column("reply_chance", sa.Integer, nullable=True),
    sa.Column("follow_up_seconds", sa.Integer, nullable=True),
    sa.Column("name_trigger", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("training_export", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("author_note", sa.Text, nullable=True),
    sa.Column("author_note_depth", sa.Integer, nullable=True),
    sa.Column("author_note_every", sa.Integer, nullable=True),
    sa.Column("memory", sa.Text, nullable=True),
    sa.Column("memory_until", Id, nullable=True),
]
MESSAGE_COLUMNS = [
    sa.Column("persona", sa.String(200), nullable=True),
    sa.Column("attachments", sa.Text, nullable=True),
    sa.Column("swipe", sa.Integer, nullable=True),
    sa.Column("mentions", sa.Text, nullable=True),
]


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        for column in CONVERSATION_COLUMNS:
            batch.add_column(column.copy())
    with op.batch_alter_table("messages") as batch:
        for column in MESSAGE_COLUMNS:
            batch.add_column(column.copy())
    with op.batch_alter_table("imported_personas") as batch:  # a PNG card's image: its avatar in scenes
        batch.add_column(sa.Column("avatar", sa.LargeBinary, nullable=True))
    op.create_table(
        "scene_members",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("conversation_id", Id, sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("persona", sa.String(200), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.UniqueConstraint("conversation_id", "persona", name="uq_scene_members_conversation_persona"),
    )
    op.create_table(
        "reply_alternatives",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("message_id", Id, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=True),  # how that take ended (done, stopped, …)
        sa.Column("notice", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("message_id", "position", name="uq_reply_alternatives_message_position"),
    )
    op.create_table(
        "user_personas",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("guild_id", sa.String(32), nullable=False),  # "" : the person's default everywhere
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("user_id", "guild_id", name="uq_user_personas_user_guild"),
    )


def downgrade() -> None:
    op.drop_table("user_personas")
    op.drop_table("reply_alternatives")
    op.drop_table("scene_members")
    with op.batch_alter_table("imported_personas") as batch:
        batch.drop_column("avatar")
    with op.batch_alter_table("messages") as batch:
        for column in reversed(MESSAGE_COLUMNS):
            batch.drop_column(column.name)
    with op.batch_alter_table("conversations") as batch:
        for column in reversed(CONVERSATION_COLUMNS):
            batch.drop_column(column.name)
