"""Several processes start at once on a fresh database (shards started together, a restart
loop) and each migrates it at start: one migrates, the others wait and find it done. Real
OS processes, on a SQLite file and on a real PostgreSQL.

Checked by hand that these fail without the locks in bot/storage/migrate.py and migrations/env.py:
the SQLite test failed in 3 runs of 3 (3 of the 4 processes died of "database is locked"),
the PostgreSQL one in 2 of 3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncio

from sqlalchemy import text

from bot.storage.store import create_engine

pytest_plugins = ["tests.pg"]
PROCESSES = 4
UPGRADE = "import sys; from bot.storage import migrate; migrate.upgrade(sys.argv[1])"


def upgrade_at_once(url: str) -> list[subprocess.CompletedProcess[str]]:
    racers = [subprocess.Popen([sys.executable, "-c", UPGRADE, url], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(PROCESSES)]
    return [subprocess.CompletedProcess(p.args, p.wait(120), p.communicate()[0]) for p in racers]


def head_revision() -> str:
    from bot.storage.migrate import alembic_config
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


async def versions_of(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("select count(*) from conversations"))).scalar() == 0
            return list((await connection.execute(text("select version_num from alembic_version"))).scalars())
    finally:
        await engine.dispose()


def assert_migrated_once(results: list[subprocess.CompletedProcess[str]], url: str) -> None:
    for result in results:
        assert result.returncode == 0, result.stdout[-2000:]
    assert asyncio.run(versions_of(url)) == [head_revision()]


def test_processes_migrating_one_fresh_sqlite_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    url = f"sqlite+aiosqlite:///{path}"
    assert_migrated_once(upgrade_at_once(url), url)


def test_processes_migrating_one_fresh_postgresql_database_at_once(postgres_url: str) -> None:
    assert_migrated_once(upgrade_at_once(postgres_url), postgres_url)
