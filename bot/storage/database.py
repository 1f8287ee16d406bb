"""The database connection: engines (SQLite pragmas, PostgreSQL pool checks), sessions, and
the retries that wait out a lock or a database that went away (`bot.storage.reconnect`)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import (
    event,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot.core.conversation import utcnow
from bot.storage.late_deletions import LateDeletions
from bot.storage.reconnect import Availability, DatabaseUnavailable, is_disconnect
from bot.storage.tables import Base, ConversationRow
from bot.telemetry import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
LOCK_WAIT_SECONDS = 30.0  # how long a write waits for another process's lock (then again, retried)
DATABASE_RETRY_SECONDS = 60.0  # how long an operation is retried while the database is away
POOL_RECYCLE_SECONDS = 1800  # PostgreSQL connections older than this are replaced, never reused
_retrying = contextvars.ContextVar("store_retrying", default=False)  # inside a retried operation


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
    """A read run again, whole, while the database is away (`StoreBase._retry`)."""

    @functools.wraps(method)
    async def retried(self: StoreBase, *args: Any, **kwargs: Any) -> T:
        return await self._retry(lambda: method(self, *args, **kwargs))

    return retried


class StoreBase:
    """The engine, sessions and retries every group of queries uses (`bot.storage.store.Store`
    puts the groups together)."""

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
        self.late_deletions = LateDeletions()  # deleted in Discord before they were stored

    @classmethod
    async def open(cls, database_url: str, migrate: bool = True,
                   retry_seconds: float = DATABASE_RETRY_SECONDS) -> Self:
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
                        metrics.DATABASE_RETRIES.labels("lock").inc()
                    elif is_disconnect(error):
                        self.availability.went_away(error, self.retry_seconds)
                        away_until = away_until or now + self.retry_seconds
                        if now >= away_until:
                            raise DatabaseUnavailable(
                                f"the database did not answer for {self.retry_seconds:.0f} s: {error}") from error
                        metrics.DATABASE_RETRIES.labels("disconnect").inc()
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

