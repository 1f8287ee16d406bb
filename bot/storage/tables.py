"""The tables of the history (SQLAlchemy 2 declarative; the schema is owned by Alembic,
`migrations/`) and the conversions between their rows and the plain values of `bot.core`."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bot.core.conversation import STREAMING, Message, StoredReply, utcnow

log = logging.getLogger(__name__)
MAX_AVATAR_BYTES = 1024 * 1024  # an imported card's image kept as its avatar (Discord's limit is 8 MB)
# SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere ids are 64-bit.
Id = BigInteger().with_variant(Integer, "sqlite")


class ConversationGone(LookupError):
    """The conversation was deleted (the bot left its server, /forget everything)."""


class Base(DeclarativeBase):
    pass


class CleanString(TypeDecorator[str]):
    """Text as PostgreSQL takes it (SQLite takes anything): without NUL characters, which
    its text types refuse (a model's byte token can produce one), and cut to the column's
    length, which it enforces (a character card's name can be longer)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, str):
            value = value.replace("\x00", "")
            if getattr(self.impl, "length", None):
                value = value[: self.impl.length]
        return value


class CleanText(CleanString):
    impl = Text
    cache_ok = True


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    persona: Mapped[str | None] = mapped_column(String(200))
    enabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # Messages with an id <= forget_before_id are hidden from the prompt (set by /reset).
    forget_before_id: Mapped[int | None] = mapped_column(Id)
    is_dm: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    guild_id: Mapped[str | None] = mapped_column(String(32), index=True)  # the Discord server, if any
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Roleplay (migration 0006). A scene: who answers when no character is named.
    scene_strategy: Mapped[str | None] = mapped_column(String(16))  # natural | list | random
    # When to speak, for messages that do not address the bot.
    reply_chance: Mapped[int | None] = mapped_column(Integer)  # percent
    follow_up_seconds: Mapped[int | None] = mapped_column(Integer)
    name_trigger: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    training_export: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The author's note: inserted `author_note_depth` messages from the end, every N turns.
    author_note: Mapped[str | None] = mapped_column(CleanText)
    author_note_depth: Mapped[int | None] = mapped_column(Integer)
    author_note_every: Mapped[int | None] = mapped_column(Integer)
    # The rolling summary of the turns up to and including message row `memory_until`.
    memory: Mapped[str | None] = mapped_column(CleanText)
    memory_until: Mapped[int | None] = mapped_column(Id)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        Index("ix_messages_reply_status", "reply_status"),
        Index("ix_messages_undelivered", "undelivered"),
        Index("ix_messages_created_at", "created_at"),
        UniqueConstraint("conversation_id", "platform_id", name="uq_messages_conversation_platform"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(
        Id, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    platform_id: Mapped[str | None] = mapped_column(String(64))
    author_id: Mapped[str] = mapped_column(String(64))
    author_name: Mapped[str] = mapped_column(CleanString(200))
    is_bot: Mapped[bool] = mapped_column(Boolean)
    content: Mapped[str] = mapped_column(CleanText)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    edited_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Bot replies only: their lifecycle (see bot.core.conversation.StoredReply).
    reply_status: Mapped[str | None] = mapped_column(String(16))
    reply_to: Mapped[str | None] = mapped_column(String(64))
    requester_id: Mapped[str | None] = mapped_column(String(64))
    part_ids: Mapped[str | None] = mapped_column(Text)  # JSON list of Discord message ids
    notice: Mapped[str | None] = mapped_column(CleanText)
    undelivered: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    persona: Mapped[str | None] = mapped_column(String(200))  # bot messages: the character that spoke
    attachments: Mapped[str | None] = mapped_column(CleanText)  # text read from attached files
    swipe: Mapped[int | None] = mapped_column(Integer)  # replies: the alternative shown (reply_alternatives)
    mentions: Mapped[str | None] = mapped_column(CleanText)  # JSON [[id, display name], …] of people mentioned


class SceneMemberRow(Base):
    """A character of a channel's scene, in the order people listed them."""

    __tablename__ = "scene_members"
    __table_args__ = (UniqueConstraint("conversation_id", "persona", name="uq_scene_members_conversation_persona"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id", ondelete="CASCADE"))
    persona: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)


class ReplyAlternativeRow(Base):
    """One swipe of a reply: the texts it had; `messages.swipe` says which is shown."""

    __tablename__ = "reply_alternatives"
    __table_args__ = (UniqueConstraint("message_id", "position", name="uq_reply_alternatives_message_position"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(Id, ForeignKey("messages.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(CleanText)
    status: Mapped[str | None] = mapped_column(String(16))  # how that take ended (done, stopped, …)
    notice: Mapped[str | None] = mapped_column(CleanText)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserPersonaRow(Base):
    """Who a person plays (`/me set`): per server, or everywhere (guild_id "")."""

    __tablename__ = "user_personas"
    __table_args__ = (UniqueConstraint("user_id", "guild_id", name="uq_user_personas_user_guild"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64))
    guild_id: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(CleanText)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImportedPersonaRow(Base):
    __tablename__ = "imported_personas"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(100), unique=True)
    card: Mapped[str] = mapped_column(Text)  # the card's JSON, as imported
    filename: Mapped[str] = mapped_column(String(200))
    imported_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary)  # a PNG card's image (webhook avatar in scenes)


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _to_message(row: MessageRow) -> Message:
    return Message(
        author_id=row.author_id,
        author_name=row.author_name,
        content=row.content,
        is_bot=row.is_bot,
        platform_id=row.platform_id,
        created_at=_aware(row.created_at),
        attachments=row.attachments or "",
    )


def _to_reply(row: MessageRow, key: str) -> StoredReply:
    return StoredReply(
        id=row.id,
        key=key,
        status=row.reply_status or STREAMING,
        content=row.content,
        author_name=row.author_name,
        part_ids=tuple(json.loads(row.part_ids or "[]")),
        reply_to=row.reply_to,
        requester_id=row.requester_id,
        notice=row.notice,
        undelivered=row.undelivered,
        persona=row.persona,
    )


def _message_values(conversation_id: int, message: Message) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "platform_id": message.platform_id,
        "author_id": message.author_id,
        "author_name": message.author_name,
        "is_bot": message.is_bot,
        "content": message.content,
        "created_at": message.created_at,
        "attachments": message.attachments or None,
        "mentions": json.dumps([list(m) for m in message.mentions]) if message.mentions else None,
    }
