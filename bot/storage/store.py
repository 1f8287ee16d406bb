"""Conversation history: SQLAlchemy 2 async tables and the queries the bot needs.

The schema is owned by Alembic (`migrations/`); `Store.open` upgrades it before use.
SQLite is the default (WAL mode); `DATABASE_URL` may point at PostgreSQL: the only
dialect-specific parts are the SQLite pragmas and transaction mode, and the dialect's own
`INSERT … ON CONFLICT DO NOTHING` for get-or-create.

Writes wait instead of failing: SQLite waits up to `LOCK_WAIT_SECONDS` for a lock another
process holds (busy timeout), starts write transactions with `BEGIN IMMEDIATE` (so a
transaction never has to upgrade a stale read lock), takes one writer at a time inside the
process, and retries a whole transaction that still met a lock until the same bound again.
A database that went away (a PostgreSQL restart or failover, `bot.storage.reconnect`) is waited
out the same way: the pool checks a connection before handing it out (`pool_pre_ping`) and
replaces those older than `POOL_RECYCLE_SECONDS`; a read or a write transaction that failed
with a disconnect is run again on a fresh connection, with backoff, for up to
`DATABASE_RETRY_SECONDS`, then `DatabaseUnavailable`. Inserts stay exactly-once when a retry
follows a commit whose answer was lost: messages are keyed by their Discord id, get-or-create
is `ON CONFLICT DO NOTHING`, and `begin_reply` looks for the row its first try made.
Bot replies keep their lifecycle here (`begin_reply` … `finish_reply`, `mark_delivered`):
see `bot.edge.reply_stream`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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
    and_,
    case,
    delete,
    event,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bot.roleplay.author_note import DEFAULT_DEPTH as DEFAULT_NOTE_DEPTH
from bot.storage.reconnect import Availability, DatabaseUnavailable, is_disconnect
from bot.roleplay.author_note import DEFAULT_EVERY as DEFAULT_NOTE_EVERY
from bot.roleplay.author_note import AuthorNote
from bot.core.conversation import DONE, FINAL_STATES, STREAMING, ConversationState, Message, StoredReply, utcnow
from bot.roleplay.memory import MemoryState
from bot.roleplay.swipes import SwipeView, plan_regeneration

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_AVATAR_BYTES = 1024 * 1024  # an imported card's image kept as its avatar (Discord's limit is 8 MB)
LOCK_WAIT_SECONDS = 30.0  # how long a write waits for another process's lock (then again, retried)
DATABASE_RETRY_SECONDS = 60.0  # how long an operation is retried while the database is away
POOL_RECYCLE_SECONDS = 1800  # PostgreSQL connections older than this are replaced, never reused
_retrying = contextvars.ContextVar("store_retrying", default=False)  # inside a retried operation
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


def create_engine(database_url: str, immediate: bool = False) -> AsyncEngine:
    """An async engine. For SQLite: the folder is created, WAL mode switched on, a lock held
    by another process is waited for (busy timeout), and with `immediate` every transaction
    starts with BEGIN IMMEDIATE (for the writer: it takes the write lock up front)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # A restarted server closed the pooled connections: test each before use, and never
        # keep one so long that a load balancer or failover proxy dropped it silently.
        return create_async_engine(url, pool_pre_ping=True, pool_recycle=POOL_RECYCLE_SECONDS)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": LOCK_WAIT_SECONDS})

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # The driver's own implicit BEGIN is switched off: we emit BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT_SECONDS * 1000)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _is_lock_error(error: BaseException) -> bool:
    if not isinstance(error, OperationalError):
        return False
    text = str(error.orig).lower()
    return "locked" in text or "busy" in text


def _reads(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A read run again, whole, while the database is away (`Store._retry`)."""

    @functools.wraps(method)
    async def retried(self: Store, *args: Any, **kwargs: Any) -> T:
        return await self._retry(lambda: method(self, *args, **kwargs))

    return retried


class Store:
    """All reads and writes of conversations and their messages."""

    def __init__(self, engine: AsyncEngine, writer: AsyncEngine | None = None,
                 retry_seconds: float = DATABASE_RETRY_SECONDS) -> None:
        self.engine = engine
        self.writer = writer or engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time: queue ours here instead of in the lock.
        self._write_lock = asyncio.Lock() if self._dialect == "sqlite" else None
        self.lock_wait = LOCK_WAIT_SECONDS
        self.retry_seconds = retry_seconds
        self.availability = Availability()

    @classmethod
    async def open(cls, database_url: str, migrate: bool = True,
                   retry_seconds: float = DATABASE_RETRY_SECONDS) -> Store:
        """Open the database, first applying any pending migrations."""
        if migrate:
            from bot.storage.migrate import upgrade_async

            await upgrade_async(database_url)
        engine = create_engine(database_url)
        writer = create_engine(database_url, immediate=True) if engine.dialect.name == "sqlite" else None
        return cls(engine, writer, retry_seconds)

    async def ping(self) -> bool:
        """Whether the database answers now (one `SELECT 1`, no retry)."""
        try:
            async with self.engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
        except (DBAPIError, OSError) as error:
            if not is_disconnect(error):
                raise
            return False
        self.availability.answered()
        return True

    async def close(self) -> None:
        await self.engine.dispose()
        if self.writer is not self.engine:
            await self.writer.dispose()

    async def _write(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` in one write transaction, retried as `_retry` says."""

        async def transaction() -> T:
            if self._write_lock is None:
                return await self._transaction(work)
            async with self._write_lock:
                return await self._transaction(work)

        return await self._retry(transaction)

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`; again while it meets a lock held elsewhere (SQLite: after the
        busy timeout, until `lock_wait` more), or a database that went away (on a fresh
        connection, with backoff, until `retry_seconds`: then `DatabaseUnavailable`). An
        operation inside another is retried by the outer one only."""
        if _retrying.get():
            return await operation()
        token = _retrying.set(True)
        try:
            locked_until = time.monotonic() + self.lock_wait
            away_until: float | None = None
            delay = 0.05
            while True:
                try:
                    result = await operation()
                except (DBAPIError, OSError) as error:
                    now = time.monotonic()
                    if _is_lock_error(error) and now < locked_until:
                        log.warning("the database is locked by another process; retrying the write")
                    elif is_disconnect(error):
                        self.availability.went_away(error, self.retry_seconds)
                        away_until = away_until or now + self.retry_seconds
                        if now >= away_until:
                            raise DatabaseUnavailable(
                                f"the database did not answer for {self.retry_seconds:.0f} s: {error}") from error
                    else:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
                    continue
                self.availability.answered()
                return result
        finally:
            _retrying.reset(token)

    async def _transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async with self._write_sessions() as session, session.begin():
            return await work(session)

    def _insert(self, table: type[Base]) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT DO NOTHING."""
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    async def _conversation(
        self, session: AsyncSession, key: str, is_dm: bool = False, guild_id: str | None = None
    ) -> ConversationRow:
        """Get or create, race-free: concurrent first messages all land in one row."""
        await session.execute(
            self._insert(ConversationRow)
            .values(key=key, enabled=False, is_dm=is_dm, guild_id=guild_id, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["key"])
        )
        row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
        assert row is not None
        if is_dm and not row.is_dm:
            row.is_dm = True
        if guild_id is not None and row.guild_id != guild_id:
            row.guild_id = guild_id
        return row

    @_reads
    async def state(self, key: str) -> ConversationState:
        async with self._sessions() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
        if row is None:
            return ConversationState(key=key)
        return ConversationState(key=key, persona=row.persona, enabled=row.enabled, known=True, is_dm=row.is_dm,
                                 reply_chance=row.reply_chance or 0, follow_up_seconds=row.follow_up_seconds or 0,
                                 name_trigger=row.name_trigger)

    async def add_message(self, key: str, message: Message, is_dm: bool = False, guild_id: str | None = None) -> bool:
        """Store a message; False if a message with that platform id is already stored."""

        async def work(session: AsyncSession) -> bool:
            conversation = await self._conversation(session, key, is_dm, guild_id)
            result = await session.execute(
                self._insert(MessageRow)
                .values(**_message_values(conversation.id, message))
                .on_conflict_do_nothing(index_elements=["conversation_id", "platform_id"])
            )
            return bool(result.rowcount)

        return await self._write(work)

    @_reads
    async def recent_messages(self, key: str, limit: int, after_id: int | None = None) -> list[Message]:
        """The newest `limit` visible messages after the forget point (and after row
        `after_id`: the turns a memory summary covers), oldest first.

        One bounded range scan of the (conversation_id, id) index: the cost does not grow
        with the number of messages stored. Replies with no text yet (just begun, or that
        only showed a notice) are left out: the model never reads an empty turn.
        """
        async with self._sessions() as session:
            conversation = await session.scalar(
                select(ConversationRow).where(ConversationRow.key == key)
            )
            if conversation is None:
                return []
            query = (
                select(MessageRow)
                .where(
                    MessageRow.conversation_id == conversation.id,
                    MessageRow.deleted_at.is_(None),
                    not_(and_(MessageRow.is_bot, MessageRow.content == "")),
                )
                .order_by(MessageRow.id.desc())
                .limit(limit)
            )
            if conversation.forget_before_id is not None:
                query = query.where(MessageRow.id > conversation.forget_before_id)
            if after_id is not None:
                query = query.where(MessageRow.id > after_id)
            rows = (await session.scalars(query)).all()
        return [_to_message(row) for row in reversed(rows)]

    async def edit_message(self, key: str, platform_id: str, content: str) -> bool:
        """Replace a stored message's content; False if it is not stored."""
        return await self._update_message(key, platform_id, live_only=True, content=content, edited_at=utcnow())

    async def delete_message(self, key: str, platform_id: str) -> bool:
        """A message deleted in Discord: its text is erased; a tombstone without text (ids
        and time) remains, so it never reaches a prompt again. A later part of a long reply
        erases the whole reply (its text is stored once, unsplit)."""
        platform_id = await self._reply_of_part(key, platform_id) or platform_id
        erased = await self._update_message(key, platform_id, content="", notice=None, attachments=None,
                                            deleted_at=utcnow())
        await self._drop_alternatives(key, platform_id)
        await self._forget_memory_of_message(key, platform_id)
        return erased

    @_reads
    async def _reply_of_part(self, key: str, platform_id: str) -> str | None:
        """The first part's id of the reply that has `platform_id` as a later part."""
        async with self._sessions() as session:
            return await session.scalar(
                select(MessageRow.platform_id).where(
                    MessageRow.conversation_id == self._conversation_id(key), MessageRow.reply_status.is_not(None),
                    MessageRow.platform_id != platform_id, MessageRow.part_ids.contains(f'"{platform_id}"'))
                .limit(1)
            )

    # ---- privacy: deleting for good -----------------------------------------------------

    async def forget_author(self, key: str, author_id: str, guild_id: str | None = None) -> int:
        """Delete every message of one person in a conversation (/forget), and who they
        play there (`/me`: the description for `guild_id`, by default the conversation's
        server; "" (a DM): their global default)."""
        await self._delete_user_personas(UserPersonaRow.user_id == author_id,
                                         UserPersonaRow.guild_id == (self._guild_of(key) if guild_id is None
                                                                     else guild_id))
        return await self._delete_messages(
            MessageRow.conversation_id == self._conversation_id(key), MessageRow.author_id == author_id
        )

    async def forget_conversation(self, key: str) -> int:
        """Delete a conversation's whole history (/forget everything); its settings stay."""
        return await self._delete_messages(MessageRow.conversation_id == self._conversation_id(key))

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Delete every message older than `cutoff` (RETENTION_DAYS)."""
        return await self._delete_messages(MessageRow.created_at < cutoff)

    async def purge_conversation(self, key: str) -> int:
        """A channel was deleted: its conversation and its history go."""
        return await self._delete_conversations(ConversationRow.key == key)

    async def purge_guild(self, guild_id: str) -> int:
        """The bot left (or was removed from) a server: every conversation of it goes, and
        the descriptions people set there (`/me`), and the character cards imported there."""
        await self._delete_user_personas(UserPersonaRow.guild_id == guild_id)

        async def cards(session: AsyncSession) -> None:
            await session.execute(delete(ImportedPersonaRow).where(
                ImportedPersonaRow.key.startswith(f"g{guild_id}/", autoescape=True)))

        await self._write(cards)
        return await self._delete_conversations(ConversationRow.guild_id == guild_id)

    @staticmethod
    def _conversation_id(key: str) -> Any:
        return select(ConversationRow.id).where(ConversationRow.key == key).scalar_subquery()

    async def _delete_messages(self, *conditions: Any) -> int:
        """Delete messages for good; the memory summaries of their conversations go too
        (rebuilt without them), so no deleted word survives in one."""

        async def work(session: AsyncSession) -> int:
            touched = select(MessageRow.conversation_id).where(*conditions).distinct()
            await session.execute(update(ConversationRow).where(ConversationRow.id.in_(touched))
                                  .values(memory=None, memory_until=None))
            return int((await session.execute(delete(MessageRow).where(*conditions))).rowcount)

        return await self._write(work)

    async def _delete_conversations(self, condition: Any) -> int:
        """Delete conversations and (explicitly, whatever the foreign keys do) their messages."""

        async def work(session: AsyncSession) -> int:
            ids = select(ConversationRow.id).where(condition).scalar_subquery()
            await session.execute(delete(MessageRow).where(MessageRow.conversation_id.in_(ids)))
            return int((await session.execute(delete(ConversationRow).where(condition))).rowcount)

        return await self._write(work)

    async def _update_message(self, key: str, platform_id: str, live_only: bool = False, **values: object) -> bool:
        """Update a stored message; `live_only`: not if it was deleted meanwhile (an edit or
        a file read that arrives after the deletion must not bring text back)."""

        async def work(session: AsyncSession) -> bool:
            conversation_id = select(ConversationRow.id).where(ConversationRow.key == key)
            conditions = [MessageRow.conversation_id == conversation_id.scalar_subquery(),
                          MessageRow.platform_id == platform_id]
            if live_only:
                conditions.append(MessageRow.deleted_at.is_(None))
            result = await session.execute(update(MessageRow).where(*conditions).values(**values))
            return bool(result.rowcount)

        return await self._write(work)

    async def reset(self, key: str) -> None:
        """Forget everything stored so far in this conversation (kept, but hidden)."""

        async def work(session: AsyncSession) -> None:
            conversation = await self._conversation(session, key)
            newest = await session.scalar(
                select(func.max(MessageRow.id)).where(MessageRow.conversation_id == conversation.id)
            )
            conversation.forget_before_id = newest
            conversation.memory = conversation.memory_until = None

        await self._write(work)

    async def set_persona(self, key: str, persona: str | None) -> None:
        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key)).persona = persona

        await self._write(work)

    async def set_enabled(self, key: str, enabled: bool) -> None:
        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key)).enabled = enabled

        await self._write(work)

    async def save_imported_persona(self, key: str, card: dict[str, Any], filename: str, user_id: str,
                                    avatar: bytes | None = None) -> None:
        """Store (or replace) an imported character card under `key`, with its image (a PNG
        card's bytes, at most `MAX_AVATAR_BYTES`, else none)."""

        async def work(session: AsyncSession) -> None:
            row = await session.scalar(select(ImportedPersonaRow).where(ImportedPersonaRow.key == key))
            if row is None:
                row = ImportedPersonaRow(key=key)
                session.add(row)
            row.card, row.filename, row.imported_by = json.dumps(card), filename[:200], user_id
            row.avatar = avatar if avatar is not None and len(avatar) <= MAX_AVATAR_BYTES else None

        await self._write(work)

    @_reads
    async def imported_personas(self) -> dict[str, dict[str, Any]]:
        """Every imported card, key → card JSON object."""
        async with self._sessions() as session:
            rows = (await session.scalars(select(ImportedPersonaRow).order_by(ImportedPersonaRow.key))).all()
        return {row.key: json.loads(row.card) for row in rows}

    @_reads
    async def enabled_keys(self) -> set[str]:
        async with self._sessions() as session:
            keys = await session.scalars(select(ConversationRow.key).where(ConversationRow.enabled))
        return set(keys)

    # ---- replies: their lifecycle (bot.edge.reply_stream drives it) -------------------------

    async def begin_reply(
        self, key: str, *, author_id: str, author_name: str, reply_to: str | None, requester_id: str | None,
        persona: str | None = None,
    ) -> int:
        """A new reply, `streaming`, with no text yet; its row id. `ConversationGone` if the
        conversation is not stored (any more): the bot left its server, or it was forgotten,
        while the answer waited; it must not come back without its server."""

        began = utcnow()
        tries = 0

        async def work(session: AsyncSession) -> int:
            nonlocal tries
            tries += 1
            conversation = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if conversation is None:
                raise ConversationGone(f"conversation {key} is not stored (deleted meanwhile)")
            if tries > 1:  # a retry: the first try's commit may have landed with its answer lost
                made = await session.scalar(select(MessageRow.id).where(
                    MessageRow.conversation_id == conversation.id, MessageRow.is_bot.is_(True),
                    MessageRow.reply_status == STREAMING, MessageRow.content == "",
                    MessageRow.author_id == author_id, MessageRow.created_at >= began,
                    MessageRow.reply_to.is_(None) if reply_to is None else MessageRow.reply_to == reply_to,
                    MessageRow.persona.is_(None) if persona is None else MessageRow.persona == persona,
                ).order_by(MessageRow.id.desc()).limit(1))
                if made is not None:
                    return int(made)
            row = MessageRow(
                conversation_id=conversation.id, author_id=author_id, author_name=author_name, is_bot=True,
                content="", created_at=utcnow(), reply_status=STREAMING, reply_to=reply_to,
                requester_id=requester_id, part_ids="[]", undelivered=False, persona=persona,
            )
            session.add(row)
            await session.flush()
            return row.id

        return await self._write(work)

    async def restart_reply(self, reply_id: int, author_name: str) -> None:
        """Regenerate: the reply streams again from nothing, in the same Discord parts; the
        text it showed is kept as an alternative first, in the same transaction (swipes)."""

        async def work(session: AsyncSession) -> None:
            await self._keep_alternative(session, reply_id)
            await session.execute(update(MessageRow).where(MessageRow.id == reply_id).values(
                content="", reply_status=STREAMING, notice=None, author_name=author_name))

        await self._write(work)

    async def update_reply(self, reply_id: int, content: str, part_ids: Sequence[str]) -> None:
        """What Discord shows now: the model's text so far, in these parts."""
        await self._update_reply(reply_id, **self._shown(content, part_ids))

    async def set_part_ids(self, reply_id: int, part_ids: Sequence[str]) -> None:
        """The Discord parts of a reply (found again after a crash), its text untouched."""
        await self._update_reply(reply_id, part_ids=json.dumps(list(part_ids)),
                                 platform_id=part_ids[0] if part_ids else None)

    async def finish_reply(self, reply_id: int, status: str, content: str, notice: str | None) -> None:
        """The reply's final state; Discord is brought in step next (`mark_delivered`)."""
        if status not in FINAL_STATES:
            raise ValueError(f"not a final reply state: {status}")
        await self._update_reply(reply_id, reply_status=status, content=content, notice=notice, undelivered=True)

    async def mark_delivered(self, reply_id: int, content: str, part_ids: Sequence[str]) -> None:
        """Discord shows the reply's final state in these parts."""
        await self._update_reply(reply_id, undelivered=False, **self._shown(content, part_ids))

    @staticmethod
    def _shown(content: str, part_ids: Sequence[str]) -> dict[str, Any]:
        # The first part's id identifies the reply (edits, deletions, buttons).
        return {"content": content, "part_ids": json.dumps(list(part_ids)),
                "platform_id": part_ids[0] if part_ids else None}

    async def _update_reply(self, reply_id: int, **values: Any) -> None:
        if "content" in values:  # a reply deleted in Discord meanwhile stays without text
            text = literal(values["content"], MessageRow.__table__.c.content.type)  # cleaned like any text
            values["content"] = case((MessageRow.deleted_at.is_(None), text), else_="")

        async def work(session: AsyncSession) -> None:
            await session.execute(update(MessageRow).where(MessageRow.id == reply_id).values(**values))

        await self._write(work)

    @_reads
    async def reply(self, reply_id: int) -> StoredReply | None:
        async with self._sessions() as session:
            found = (await session.execute(
                select(MessageRow, ConversationRow.key)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(MessageRow.id == reply_id)
            )).first()
        return _to_reply(found[0], found[1]) if found else None

    @_reads
    async def reply_by_part(self, key: str, platform_id: str) -> StoredReply | None:
        """The reply whose first Discord part has this id."""
        async with self._sessions() as session:
            row = await session.scalar(
                select(MessageRow)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(ConversationRow.key == key, MessageRow.platform_id == platform_id,
                       MessageRow.reply_status.is_not(None))
            )
        return _to_reply(row, key) if row else None

    @_reads
    async def holds_part(self, key: str, platform_id: str) -> bool:
        """Whether a Discord message is stored in this conversation: as a message, or as
        any part of a reply."""
        async with self._sessions() as session:
            found = await session.scalar(
                select(MessageRow.id)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(ConversationRow.key == key,
                       or_(MessageRow.platform_id == platform_id, MessageRow.part_ids.contains(f'"{platform_id}"')))
                .limit(1)
            )
        return found is not None

    async def interrupt_streaming(self, notice: str) -> int:
        """At start: replies a crash left `streaming` are `interrupted` (and Discord is to
        be brought in step). How many there were."""

        async def work(session: AsyncSession) -> int:
            result = await session.execute(
                update(MessageRow).where(MessageRow.reply_status == STREAMING)
                .values(reply_status="interrupted", notice=notice, undelivered=True)
            )
            return int(result.rowcount)

        return await self._write(work)

    @_reads
    async def undelivered_replies(self, limit: int = 100) -> list[StoredReply]:
        """Final replies that Discord does not show as such yet, oldest first."""
        async with self._sessions() as session:
            rows = (await session.execute(
                select(MessageRow, ConversationRow.key)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(MessageRow.undelivered, MessageRow.reply_status != STREAMING)
                .order_by(MessageRow.id)
                .limit(limit)
            )).all()
        return [_to_reply(row, key) for row, key in rows]

    @_reads
    async def recovery_keys(self) -> list[str]:
        """Conversations to back-fill after a restart: enabled channels and DMs."""
        async with self._sessions() as session:
            keys = await session.scalars(
                select(ConversationRow.key).where(or_(ConversationRow.enabled, ConversationRow.is_dm))
            )
        return list(keys)

    @_reads
    async def active_keys(self, since: datetime) -> list[str]:
        """Conversations where someone wrote since `since` (one range scan of the time index)."""
        async with self._sessions() as session:
            keys = await session.scalars(
                select(ConversationRow.key).where(ConversationRow.id.in_(
                    select(MessageRow.conversation_id).where(MessageRow.created_at >= since).distinct()
                ))
            )
        return list(keys)

    @_reads
    async def newest_platform_id(self, key: str, window: int = 50) -> int | None:
        """The newest Discord message id of a person stored in a conversation (among its
        newest rows): where reading back what was missed starts. (The bot's own messages do
        not count: one it posted after a crash would hide what was said before it.)"""
        async with self._sessions() as session:
            ids = await session.scalars(
                select(MessageRow.platform_id)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(ConversationRow.key == key, MessageRow.platform_id.is_not(None),
                       MessageRow.is_bot.is_(False))
                .order_by(MessageRow.id.desc())
                .limit(window)
            )
            numbers = [int(i) for i in ids if i.isdigit()]
        return max(numbers, default=None)

    @_reads
    async def unanswered(self, key: str, since: datetime) -> Message | None:
        """The newest message from a person since `since` that no reply of the bot follows."""
        async with self._sessions() as session:
            conversation = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if conversation is None:
                return None
            newest = await session.scalar(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation.id, MessageRow.deleted_at.is_(None))
                .order_by(MessageRow.id.desc())
                .limit(1)
            )
        if newest is None or newest.is_bot or _aware(newest.created_at) < since:
            return None
        return _to_message(newest)

    @_reads
    async def last_question(self, key: str, since: datetime) -> Message | None:
        """The newest message from a person since `since`, whether replies follow it or not
        (a scene question that several characters answer in turn)."""
        async with self._sessions() as session:
            newest = await session.scalar(
                select(MessageRow)
                .where(MessageRow.conversation_id == self._conversation_id(key), MessageRow.deleted_at.is_(None),
                       MessageRow.is_bot.is_(False))
                .order_by(MessageRow.id.desc()).limit(1)
            )
        return _to_message(newest) if newest is not None and _aware(newest.created_at) >= since else None

    @_reads
    async def replied_personas(self, key: str, question_id: str) -> set[str | None]:
        """Who answered a question: the persona keys of its replies (None: not a scene's)."""
        async with self._sessions() as session:
            found = await session.scalars(
                select(MessageRow.persona).where(
                    MessageRow.conversation_id == self._conversation_id(key), MessageRow.reply_to == question_id,
                    MessageRow.reply_status.is_not(None))
            )
            return set(found)

    # ---- training export: /channel training-export, `hermes-bot export-dataset` ----------

    async def set_training_export(self, key: str, on: bool) -> None:
        """Opt a channel in (or out) of the training dataset export."""

        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key)).training_export = on

        await self._write(work)

    @_reads
    async def training_export_conversations(self) -> list[tuple[int, str, str | None, int | None]]:
        """The opted-in conversations: (id, key, persona, forget_before_id), oldest first."""
        async with self._sessions() as session:
            rows = (await session.execute(
                select(ConversationRow.id, ConversationRow.key, ConversationRow.persona,
                       ConversationRow.forget_before_id)
                .where(ConversationRow.training_export).order_by(ConversationRow.id)
            )).all()
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    @_reads
    async def conversation_people(self, conversation_id: int) -> list[tuple[str, str]]:
        """Every (author id, display name) of the people (not the bot) stored in a
        conversation, hidden rows included, in order of first appearance; then the people
        their messages mention (not the bot)."""
        async with self._sessions() as session:
            rows = (await session.execute(
                select(MessageRow.author_id, MessageRow.author_name, func.min(MessageRow.id).label("first"))
                .where(MessageRow.conversation_id == conversation_id, MessageRow.is_bot.is_(False))
                .group_by(MessageRow.author_id, MessageRow.author_name).order_by("first")
            )).all()
            mentioned = await session.scalars(
                select(MessageRow.mentions).where(MessageRow.conversation_id == conversation_id,
                                                  MessageRow.mentions.is_not(None)).order_by(MessageRow.id)
            )
            mentioned = list(mentioned)
            own = set(await session.scalars(  # the bot itself is no person
                select(MessageRow.author_id).where(MessageRow.conversation_id == conversation_id,
                                                   MessageRow.reply_status.is_not(None)).distinct()))
        people = [(row[0], row[1]) for row in rows]
        for mentions in mentioned:  # people named in a mention who may never have written here
            people += [(str(i), str(name)) for i, name in json.loads(mentions) if str(i) not in own]
        return list(dict.fromkeys(people))

    @_reads
    async def reply_author_ids(self, conversation_id: int) -> set[str]:
        """Who wrote the bot's replies in a conversation (its own words, as against other
        bots' and webhooks' messages)."""
        async with self._sessions() as session:
            ids = await session.scalars(
                select(MessageRow.author_id).where(MessageRow.conversation_id == conversation_id,
                                                   MessageRow.reply_status.is_not(None)).distinct()
            )
            return set(ids)

    @_reads
    async def export_turns(
        self, conversation_id: int, after_id: int, limit: int
    ) -> list[tuple[int, Message, str | None, str | None]]:
        """The next `limit` messages after row `after_id` that a prompt may show (not
        deleted, no empty bot turn), oldest first: (row id, message, reply status, persona)."""
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation_id, MessageRow.id > after_id,
                       MessageRow.deleted_at.is_(None), not_(and_(MessageRow.is_bot, MessageRow.content == "")))
                .order_by(MessageRow.id).limit(limit)
            )).all()
        return [(row.id, _to_message(row), row.reply_status, row.persona) for row in rows]

    # ---- swipes: a reply's alternatives, Continue (rules in bot.roleplay.swipes) ------------------

    @_reads
    async def swipe_view(self, reply_id: int) -> SwipeView:
        """The alternatives of a reply, as the buttons show them."""
        async with self._sessions() as session:
            shown = await session.scalar(select(MessageRow.swipe).where(MessageRow.id == reply_id))
            saved = await session.scalars(
                select(ReplyAlternativeRow.position).where(ReplyAlternativeRow.message_id == reply_id))
            return SwipeView.of(list(saved), shown)

    @_reads
    async def alternatives(self, reply_id: int) -> list[str]:
        """The texts of a reply's alternatives in order, the shown one as it is now."""
        async with self._sessions() as session:
            row = await session.get(MessageRow, reply_id)
            if row is None:
                return []
            saved = {a.position: a.content for a in await session.scalars(
                select(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id == reply_id))}
        view = SwipeView.of(list(saved), row.swipe)
        return [row.content if position == view.shown else saved[position] for position in view.positions]

    async def swipe_reply(self, reply_id: int, step: int) -> tuple[StoredReply, SwipeView] | None:
        """Show the alternative `step` (-1, +1) away: the shown text is saved at its position
        first, then it becomes the reply's content (the one in history), final and to be
        delivered. None past either end (or no such reply)."""

        async def work(session: AsyncSession) -> tuple[StoredReply, SwipeView] | None:
            found = (await session.execute(
                select(MessageRow, ConversationRow.key)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(MessageRow.id == reply_id)
            )).first()
            if found is None:
                return None
            row, key = found
            saved = {a.position: a for a in await session.scalars(
                select(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id == reply_id))}
            view = SwipeView.of(list(saved), row.swipe)
            target = view.neighbour(step)
            if target is None:
                return None
            positions = view.positions
            if row.content.strip():
                await self._save_alternative(session, row, view.shown, saved.get(view.shown))
            else:  # a try that wrote nothing is not kept as an alternative
                await session.execute(delete(ReplyAlternativeRow).where(
                    ReplyAlternativeRow.message_id == reply_id, ReplyAlternativeRow.position == view.shown))
                positions = tuple(p for p in positions if p != view.shown)
            row.content, row.swipe = saved[target].content, target
            # The take comes back as it ended: a stopped one stays stopped (its notice
            # shown, never exported as a finished answer).
            row.reply_status, row.notice, row.undelivered = saved[target].status or DONE, saved[target].notice, True
            await session.flush()
            return _to_reply(row, key), SwipeView(positions, target)

        return await self._write(work)

    @_reads
    async def latest_reply(self, key: str) -> StoredReply | None:
        """The conversation's newest reply of the bot that is not deleted (the only one
        that can be swiped or continued)."""
        async with self._sessions() as session:
            row = await session.scalar(
                select(MessageRow).where(MessageRow.conversation_id == self._conversation_id(key),
                                         MessageRow.reply_status.is_not(None), MessageRow.deleted_at.is_(None))
                .order_by(MessageRow.id.desc()).limit(1)
            )
        return _to_reply(row, key) if row else None

    async def resume_reply(self, reply_id: int) -> None:
        """Continue: the reply streams again, its text kept, more to be added after it."""
        await self._update_reply(reply_id, reply_status=STREAMING, notice=None)

    async def _keep_alternative(self, session: AsyncSession, reply_id: int) -> None:
        """Regenerate: save the shown text as an alternative (within the limit) and make
        the position of the one about to be written the shown one."""
        row = await session.get(MessageRow, reply_id)
        if row is None:
            return
        saved = {a.position: a for a in await session.scalars(
            select(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id == reply_id))}
        plan = plan_regeneration(SwipeView.of(list(saved), row.swipe), row.content)
        if plan.save_at is not None:
            await self._save_alternative(session, row, plan.save_at, saved.get(plan.save_at))
        if plan.drop:
            await session.execute(delete(ReplyAlternativeRow).where(
                ReplyAlternativeRow.message_id == reply_id, ReplyAlternativeRow.position.in_(plan.drop)))
        row.swipe = plan.new_position

    @staticmethod
    async def _save_alternative(session: AsyncSession, row: MessageRow, position: int,
                                existing: ReplyAlternativeRow | None) -> None:
        status = row.reply_status if row.reply_status in FINAL_STATES else None
        if existing is not None:
            existing.content, existing.status, existing.notice = row.content, status, row.notice
        else:
            session.add(ReplyAlternativeRow(message_id=row.id, position=position, content=row.content,
                                            status=status, notice=row.notice, created_at=utcnow()))
            await session.flush()

    async def _drop_alternatives(self, key: str, platform_id: str) -> None:
        """A reply deleted in Discord: its alternatives are erased with its text."""

        async def work(session: AsyncSession) -> None:
            ids = select(MessageRow.id).where(MessageRow.conversation_id == self._conversation_id(key),
                                              MessageRow.platform_id == platform_id).scalar_subquery()
            await session.execute(delete(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id.in_(ids)))

        await self._write(work)

    # ---- people: user personas (/me), attachments, when to speak ------------------------

    async def set_user_persona(self, user_id: str, guild_id: str, description: str) -> None:
        """Who a person plays in a server (`guild_id` "": everywhere, their default)."""

        async def work(session: AsyncSession) -> None:
            await session.execute(
                self._insert(UserPersonaRow)
                .values(user_id=user_id, guild_id=guild_id, description=description, updated_at=utcnow())
                .on_conflict_do_update(index_elements=["user_id", "guild_id"],
                                       set_={"description": description, "updated_at": utcnow()})
            )

        await self._write(work)

    @_reads
    async def user_persona(self, user_id: str, guild_id: str) -> tuple[str, str] | None:
        """The description that applies to a person in a server (theirs there, else their
        default) and the guild id it was set for ("" for the default); None if neither."""
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(UserPersonaRow).where(UserPersonaRow.user_id == user_id,
                                             UserPersonaRow.guild_id.in_({guild_id, ""}))
            )).all()
        row = min(rows, key=lambda r: r.guild_id == "", default=None)  # the server's first
        return (row.description, row.guild_id) if row else None

    async def clear_user_persona(self, user_id: str, guild_id: str) -> bool:
        """Delete a person's description for a server ("" : their default); False if none."""
        return bool(await self._delete_user_personas(UserPersonaRow.user_id == user_id,
                                                     UserPersonaRow.guild_id == guild_id))

    @_reads
    async def user_personas_in(self, key: str, user_ids: Sequence[str]) -> dict[str, str]:
        """user id → the description that applies in this conversation's server (or, in a
        DM, the default), for the people asked about who have one."""
        if not user_ids:
            return {}
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(UserPersonaRow).where(UserPersonaRow.user_id.in_(set(user_ids)),
                                             UserPersonaRow.guild_id.in_([self._guild_of(key), ""]))
            )).all()
        chosen: dict[str, str] = {}
        for row in sorted(rows, key=lambda r: r.guild_id != ""):  # defaults, then the server's
            chosen[row.user_id] = row.description
        return chosen

    async def set_attachments(self, key: str, platform_id: str, text: str) -> bool:
        """What was read from a stored message's attached files; False if it is not stored
        (or was deleted while they were read)."""
        return await self._update_message(key, platform_id, live_only=True, attachments=text or None)

    async def set_speaking(self, key: str, reply_chance: int, follow_up_seconds: int, name_trigger: bool) -> None:
        """When the bot speaks unaddressed in a channel (`/channel speak`)."""

        async def work(session: AsyncSession) -> None:
            row = await self._conversation(session, key)
            row.reply_chance, row.follow_up_seconds, row.name_trigger = reply_chance, follow_up_seconds, name_trigger

        await self._write(work)

    @staticmethod
    def _guild_of(key: str) -> Any:
        """The conversation's server id ("" for a DM), as a subquery."""
        return (select(func.coalesce(ConversationRow.guild_id, ""))
                .where(ConversationRow.key == key).scalar_subquery())

    async def _delete_user_personas(self, *conditions: Any) -> int:
        async def work(session: AsyncSession) -> int:
            return int((await session.execute(delete(UserPersonaRow).where(*conditions))).rowcount)

        return await self._write(work)

    # ---- scenes: several characters in a channel (rules in bot.roleplay.scenes) -------------------

    @_reads
    async def scene(self, key: str) -> tuple[list[str], str | None]:
        """A conversation's scene: its characters' persona keys in listed order, and its
        strategy (None: the default)."""
        async with self._sessions() as session:
            conversation = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if conversation is None:
                return [], None
            members = await session.scalars(
                select(SceneMemberRow.persona).where(SceneMemberRow.conversation_id == conversation.id)
                .order_by(SceneMemberRow.position, SceneMemberRow.id)
            )
            return list(members), conversation.scene_strategy

    async def add_scene_member(self, key: str, persona: str, guild_id: str | None, limit: int) -> bool:
        """Add a character at the end of the scene; False if it is there already or the
        scene has `limit` characters."""

        async def work(session: AsyncSession) -> bool:
            conversation = await self._conversation(session, key, guild_id=guild_id)
            members = (await session.scalars(
                select(SceneMemberRow).where(SceneMemberRow.conversation_id == conversation.id))).all()
            if len(members) >= limit or any(m.persona == persona for m in members):
                return False
            position = max((m.position for m in members), default=-1) + 1
            session.add(SceneMemberRow(conversation_id=conversation.id, persona=persona, position=position))
            return True

        return await self._write(work)

    async def remove_scene_member(self, key: str, persona: str) -> bool:
        async def work(session: AsyncSession) -> bool:
            result = await session.execute(delete(SceneMemberRow).where(
                SceneMemberRow.conversation_id == self._conversation_id(key), SceneMemberRow.persona == persona))
            return bool(result.rowcount)

        return await self._write(work)

    async def set_scene_strategy(self, key: str, strategy: str, guild_id: str | None = None) -> None:
        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key, guild_id=guild_id)).scene_strategy = strategy

        await self._write(work)

    @_reads
    async def scene_speakers(self, key: str, limit: int = 50) -> list[str]:
        """The characters of the newest `limit` replies that named one, oldest first."""
        async with self._sessions() as session:
            personas = await session.scalars(
                select(MessageRow.persona)
                .where(MessageRow.conversation_id == self._conversation_id(key), MessageRow.is_bot,
                       MessageRow.persona.is_not(None), MessageRow.deleted_at.is_(None))
                .order_by(MessageRow.id.desc()).limit(limit)
            )
            return [p for p in reversed(list(personas)) if p]

    @_reads
    async def part_persona(self, key: str, platform_id: str) -> str | None:
        """The character that spoke in the reply with this Discord part (None: none, or not a reply)."""
        async with self._sessions() as session:
            return await session.scalar(
                select(MessageRow.persona)
                .where(MessageRow.conversation_id == self._conversation_id(key), MessageRow.is_bot,
                       or_(MessageRow.platform_id == platform_id, MessageRow.part_ids.contains(f'"{platform_id}"')))
                .limit(1)
            )

    @_reads
    async def imported_avatar(self, key: str) -> bytes | None:
        """The image of an imported PNG card (None for JSON cards and shipped personas)."""
        async with self._sessions() as session:
            return await session.scalar(select(ImportedPersonaRow.avatar).where(ImportedPersonaRow.key == key))

    # ---- memory and author's note (bot.roleplay.memory, bot.roleplay.author_note) --------------------------

    @_reads
    async def prompt_extras(self, key: str) -> tuple[MemoryState, AuthorNote, int]:
        """The conversation's memory summary, its author's note, and how many messages people
        wrote in it since the forget point (counted only when the note's frequency needs it)."""
        async with self._sessions() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if row is None:
                return MemoryState(), AuthorNote(), 0
            note = AuthorNote(row.author_note or "",
                              DEFAULT_NOTE_DEPTH if row.author_note_depth is None else row.author_note_depth,
                              DEFAULT_NOTE_EVERY if row.author_note_every is None else row.author_note_every)
            turns = 0
            if note.text and note.every > 1:
                turns = await session.scalar(
                    select(func.count(MessageRow.id)).where(
                        MessageRow.conversation_id == row.id, MessageRow.is_bot.is_(False),
                        MessageRow.deleted_at.is_(None), MessageRow.id > (row.forget_before_id or 0))
                ) or 0
        return MemoryState(row.memory or "", row.memory_until), note, turns

    @staticmethod
    def _visible_after(conversation: ConversationRow, after_id: int | None) -> list[Any]:
        return [MessageRow.conversation_id == conversation.id, MessageRow.deleted_at.is_(None),
                not_(and_(MessageRow.is_bot, MessageRow.content == "")),
                MessageRow.id > max(after_id or 0, conversation.forget_before_id or 0)]

    @_reads
    async def memory_rows(self, key: str, keep: int, limit: int) -> tuple[MemoryState, list[tuple[int, Message]]]:
        """The memory now, and the visible messages it does not cover yet, except the newest
        `keep`: the newest `limit` of those, oldest first, with their row ids."""
        async with self._sessions() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if row is None:
                return MemoryState(), []
            rows = (await session.scalars(
                select(MessageRow).where(*self._visible_after(row, row.memory_until))
                .order_by(MessageRow.id.desc()).offset(keep).limit(limit)
            )).all()
        return MemoryState(row.memory or "", row.memory_until), [(r.id, _to_message(r)) for r in reversed(rows)]

    async def save_memory(
        self, key: str, summary: str, *, since: int | None, covered: Sequence[int]
    ) -> bool:
        """Store a summary (covering everything up to the last row of `covered`) made from
        the visible messages `covered` (row ids, oldest first), unless meanwhile the memory
        changed (cleared, /reset, another summary; it covered up to `since`) or the visible
        messages of that range are no longer exactly those (one deleted or forgotten, a
        regenerated reply back). Whether it was stored."""
        first, until = covered[0], covered[-1]

        async def work(session: AsyncSession) -> bool:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if row is None or row.memory_until != since:
                return False
            still = set(await session.scalars(select(MessageRow.id).where(
                *self._visible_after(row, first - 1), MessageRow.id <= until)))
            if still != set(covered):
                return False
            row.memory, row.memory_until = summary, until
            return True

        return await self._write(work)

    async def clear_memory(self, key: str) -> bool:
        """Drop the summary (/memory clear); it is rebuilt when the history overflows again.
        Whether there was one."""

        async def work(session: AsyncSession) -> bool:
            result = await session.execute(
                update(ConversationRow).where(ConversationRow.key == key, ConversationRow.memory.is_not(None))
                .values(memory=None, memory_until=None))
            return bool(result.rowcount)

        return await self._write(work)

    async def _forget_memory_of_message(self, key: str, platform_id: str) -> None:
        """A message deleted in Discord that the summary covers: the summary goes."""

        async def work(session: AsyncSession) -> None:
            covered = select(MessageRow.id).where(
                MessageRow.conversation_id == ConversationRow.id, MessageRow.platform_id == platform_id,
                MessageRow.id <= ConversationRow.memory_until).exists()
            await session.execute(update(ConversationRow).where(ConversationRow.key == key, covered)
                                  .values(memory=None, memory_until=None))

        await self._write(work)

    async def set_author_note(self, key: str, note: AuthorNote, is_dm: bool = False, guild_id: str | None = None) -> None:
        """Set (or, with empty text, remove) the conversation's author's note."""

        async def work(session: AsyncSession) -> None:
            row = await self._conversation(session, key, is_dm, guild_id)
            row.author_note = note.text or None
            row.author_note_depth, row.author_note_every = note.depth, note.every

        await self._write(work)
