"""Apply the Alembic migrations in `migrations/` to a database URL (at start and from the CLI).

Several processes may start at once on a fresh database (shards, a restart loop): one
migrates, the others wait and then find it done. On PostgreSQL the migration transaction
takes an advisory lock (migrations/env.py); SQLite runs each migration in its own
transaction, so the whole upgrade holds a lock file beside the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from filelock import FileLock
from sqlalchemy.engine import make_url

import migrations

LOCK_WAIT_SECONDS = 600.0  # how long a process waits for another one's migration


def alembic_config(database_url: str) -> Config:
    """An Alembic config for our migrations, without needing an alembic.ini on disk."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@contextlib.contextmanager
def _one_at_a_time(database_url: str) -> Iterator[None]:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        yield  # PostgreSQL: the advisory lock in migrations/env.py
        return
    with FileLock(f"{url.database}.migrate-lock", timeout=LOCK_WAIT_SECONDS):
        yield


def upgrade(database_url: str, revision: str = "head") -> None:
    with _one_at_a_time(database_url):
        command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    with _one_at_a_time(database_url):
        command.downgrade(alembic_config(database_url), revision)


def current(database_url: str) -> None:
    command.current(alembic_config(database_url), verbose=True)


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    """Upgrade from inside a running event loop (Alembic's async env runs its own loop)."""
    await asyncio.to_thread(upgrade, database_url, revision)
