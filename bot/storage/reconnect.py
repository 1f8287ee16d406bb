"""A database that went away: telling it from a real error, and waiting it out.

PostgreSQL restarts (a minor upgrade, a managed database's maintenance window, a failover to
a replica) close every connection: the pool's connections fail with `connection is closed`
or `terminating connection due to administrator command` (57P01), and new ones are refused
while the server is down, or told `the database system is starting up` (57P03) while it
comes back. `is_disconnect` recognises these; `bot.storage.store.Store` retries the operation on a
fresh connection with backoff for up to `DATABASE_RETRY_SECONDS`, and raises
`DatabaseUnavailable` after that. `Availability` says so in the log once per outage, not
once per message, and tells the rest of the bot whether the database is answering.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

# admin_shutdown, crash_shutdown, cannot_connect_now; class 08 is "connection exception".
DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03"})
DISCONNECT_TEXT = (
    "connection is closed", "connection was closed", "connection refused", "connect call failed",
    "terminating connection", "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "server closed the connection", "connection reset",
)


class DatabaseUnavailable(Exception):
    """The database did not answer within the retry bound (it is down or unreachable)."""


def is_disconnect(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) says the connection or the server went away."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "connection_invalidated", False):  # SQLAlchemy's own verdict
            return True
        if isinstance(current, (ConnectionError, TimeoutError)):  # refused, reset, timed out
            return True
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(state, str) and (state in DISCONNECT_STATES or state.startswith("08")):
            return True
        if any(text in str(current).lower() for text in DISCONNECT_TEXT):
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


class Availability:
    """Whether the database answers; the log says when it goes away and when it is back."""

    def __init__(self) -> None:
        self.away_since: float | None = None

    @property
    def available(self) -> bool:
        return self.away_since is None

    def went_away(self, error: BaseException, retry_seconds: float) -> None:
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("the database is unreachable (%s): retrying each operation for up to %.0f s; "
                        "messages that arrive meanwhile are kept", _short(error), retry_seconds)

    def answered(self) -> None:
        if self.away_since is not None:
            log.warning("the database is back after %.1f s", time.monotonic() - self.away_since)
            self.away_since = None


def _short(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
