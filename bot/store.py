"""Conversation history: SQLAlchemy 2 async tables and the queries the bot needs.

The schema is owned by Alembic (`migrations/`); `Store.open` upgrades it before use.
SQLite is the default (WAL mode); nothing here is SQLite-only except the pragmas, so
`DATABASE_URL` may point at PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bot.conversation import ConversationState, Message, utcnow

# SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere ids are 64-bit.
Id = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    pass


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    persona: Mapped[str | None] = mapped_column(String(200))
    enabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # Messages with an id <= forget_before_id are hidden from the prompt (set by /reset).
    forget_before_id: Mapped[int | None] = mapped_column(Id)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        UniqueConstraint("conversation_id", "platform_id", name="uq_messages_conversation_platform"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(
        Id, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    platform_id: Mapped[str | None] = mapped_column(String(64))
    author_id: Mapped[str] = mapped_column(String(64))
    author_name: Mapped[str] = mapped_column(String(200))
    is_bot: Mapped[bool] = mapped_column(Boolean)
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    edited_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImportedPersonaRow(Base):
    __tablename__ = "imported_personas"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(100), unique=True)
    card: Mapped[str] = mapped_column(Text)  # the card's JSON, as imported
    filename: Mapped[str] = mapped_column(String(200))
    imported_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
    )


def _to_row(conversation_id: int, message: Message) -> MessageRow:
    return MessageRow(
        conversation_id=conversation_id,
        platform_id=message.platform_id,
        author_id=message.author_id,
        author_name=message.author_name,
        is_bot=message.is_bot,
        content=message.content,
        created_at=message.created_at,
    )


def create_engine(database_url: str) -> AsyncEngine:
    """An async engine; for SQLite, the folder is created and WAL mode switched on."""
    url = make_url(database_url)
    engine = create_async_engine(url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


class Store:
    """All reads and writes of conversations and their messages."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    async def open(cls, database_url: str, migrate: bool = True) -> Store:
        """Open the database, first applying any pending migrations."""
        if migrate:
            from bot.migrate import upgrade_async

            await upgrade_async(database_url)
        return cls(create_engine(database_url))

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session, session.begin():
            yield session

    async def _conversation(self, session: AsyncSession, key: str) -> ConversationRow:
        row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
        if row is None:
            row = ConversationRow(key=key, enabled=False)
            session.add(row)
            await session.flush()
        return row

    async def state(self, key: str) -> ConversationState:
        async with self._sessions() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
        if row is None:
            return ConversationState(key=key)
        return ConversationState(key=key, persona=row.persona, enabled=row.enabled, known=True)

    async def add_message(self, key: str, message: Message) -> bool:
        """Store a message; False if a message with that platform id is already stored."""
        async with self._session() as session:
            conversation = await self._conversation(session, key)
            if message.platform_id is not None:
                exists = await session.scalar(
                    select(MessageRow.id).where(
                        MessageRow.conversation_id == conversation.id,
                        MessageRow.platform_id == message.platform_id,
                    )
                )
                if exists is not None:
                    return False
            session.add(_to_row(conversation.id, message))
        return True

    async def put_message(self, key: str, message: Message) -> None:
        """Store a message with a platform id, or replace the content of the one stored
        with it (bringing it back if it was deleted): how the bot records its replies."""
        if message.platform_id is None:
            raise ValueError("put_message needs a platform id; use add_message")
        async with self._session() as session:
            conversation = await self._conversation(session, key)
            row = await session.scalar(
                select(MessageRow).where(
                    MessageRow.conversation_id == conversation.id,
                    MessageRow.platform_id == message.platform_id,
                )
            )
            if row is None:
                session.add(_to_row(conversation.id, message))
            else:
                row.content, row.author_name, row.deleted_at = message.content, message.author_name, None

    async def recent_messages(self, key: str, limit: int) -> list[Message]:
        """The newest `limit` visible messages after the forget point, oldest first.

        One bounded range scan of the (conversation_id, id) index: the cost does not grow
        with the number of messages stored.
        """
        async with self._sessions() as session:
            conversation = await session.scalar(
                select(ConversationRow).where(ConversationRow.key == key)
            )
            if conversation is None:
                return []
            query = (
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation.id, MessageRow.deleted_at.is_(None))
                .order_by(MessageRow.id.desc())
                .limit(limit)
            )
            if conversation.forget_before_id is not None:
                query = query.where(MessageRow.id > conversation.forget_before_id)
            rows = (await session.scalars(query)).all()
        return [_to_message(row) for row in reversed(rows)]

    async def edit_message(self, key: str, platform_id: str, content: str) -> bool:
        """Replace a stored message's content; False if it is not stored."""
        return await self._update_message(key, platform_id, content=content, edited_at=utcnow())

    async def delete_message(self, key: str, platform_id: str) -> bool:
        """Mark a stored message deleted: it never reaches a prompt again."""
        return await self._update_message(key, platform_id, deleted_at=utcnow())

    async def _update_message(self, key: str, platform_id: str, **values: object) -> bool:
        async with self._session() as session:
            conversation_id = select(ConversationRow.id).where(ConversationRow.key == key)
            result = await session.execute(
                update(MessageRow)
                .where(
                    MessageRow.conversation_id == conversation_id.scalar_subquery(),
                    MessageRow.platform_id == platform_id,
                )
                .values(**values)
            )
        return bool(result.rowcount)

    async def reset(self, key: str) -> None:
        """Forget everything stored so far in this conversation (kept, but hidden)."""
        async with self._session() as session:
            conversation = await self._conversation(session, key)
            newest = await session.scalar(
                select(func.max(MessageRow.id)).where(MessageRow.conversation_id == conversation.id)
            )
            conversation.forget_before_id = newest

    async def set_persona(self, key: str, persona: str | None) -> None:
        async with self._session() as session:
            (await self._conversation(session, key)).persona = persona

    async def set_enabled(self, key: str, enabled: bool) -> None:
        async with self._session() as session:
            (await self._conversation(session, key)).enabled = enabled

    async def save_imported_persona(self, key: str, card: dict[str, Any], filename: str, user_id: str) -> None:
        """Store (or replace) an imported character card under `key`."""
        async with self._session() as session:
            row = await session.scalar(select(ImportedPersonaRow).where(ImportedPersonaRow.key == key))
            if row is None:
                row = ImportedPersonaRow(key=key)
                session.add(row)
            row.card, row.filename, row.imported_by = json.dumps(card), filename[:200], user_id

    async def imported_personas(self) -> dict[str, dict[str, Any]]:
        """Every imported card, key → card JSON object."""
        async with self._sessions() as session:
            rows = (await session.scalars(select(ImportedPersonaRow).order_by(ImportedPersonaRow.key))).all()
        return {row.key: json.loads(row.card) for row in rows}

    async def enabled_keys(self) -> set[str]:
        async with self._sessions() as session:
            keys = await session.scalars(select(ConversationRow.key).where(ConversationRow.enabled))
        return set(keys)
