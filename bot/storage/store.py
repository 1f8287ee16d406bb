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

The queries live by concern in `*_queries.py` beside this module, each a class over
`database.StoreBase`; `Store` puts them together. The tables are in `tables.py`.
"""

from __future__ import annotations

from bot.storage.conversations_queries import ConversationQueries
from bot.storage.database import (
    DATABASE_RETRY_SECONDS,
    LOCK_WAIT_SECONDS,
    POOL_RECYCLE_SECONDS,
    create_engine,
)
from bot.storage.export_queries import ExportQueries
from bot.storage.memory_queries import MemoryQueries
from bot.storage.people_queries import PeopleQueries
from bot.storage.privacy_queries import PrivacyQueries
from bot.storage.replies_queries import ReplyQueries
from bot.storage.scenes_queries import SceneQueries
from bot.storage.swipes_queries import SwipeQueries
from bot.storage.tables import (
    MAX_AVATAR_BYTES,
    Base,
    ConversationGone,
    ConversationRow,
    ImportedPersonaRow,
    MessageRow,
    ReplyAlternativeRow,
    SceneMemberRow,
    UserPersonaRow,
    _to_reply,
)

__all__ = [
    "DATABASE_RETRY_SECONDS", "LOCK_WAIT_SECONDS", "MAX_AVATAR_BYTES", "POOL_RECYCLE_SECONDS", "Base",
    "ConversationGone", "ConversationRow", "ImportedPersonaRow", "MessageRow", "ReplyAlternativeRow",
    "SceneMemberRow", "Store", "UserPersonaRow", "_to_reply", "create_engine",
]


class Store(ConversationQueries, PrivacyQueries, ReplyQueries, ExportQueries, SwipeQueries, PeopleQueries,
            SceneQueries, MemoryQueries):
    """All reads and writes of conversations and their messages: `await Store.open(url)`."""
