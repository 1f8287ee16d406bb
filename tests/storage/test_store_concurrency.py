"""Concurrent writers on one database, as two bot processes (or a bot and a maintenance
script) would be: two separate `Store` objects, each with its own engines and pools.

- The first messages of a brand-new conversation race each other: every message is stored,
  the conversation exists exactly once, and nobody sees an IntegrityError. On PostgreSQL
  that is the work of INSERT … ON CONFLICT DO NOTHING in `Store._conversation`; the
  control test below shows the same race with a select-then-insert get-or-create failing.
- Another OS process holds SQLite's write lock: the store's write waits it out and
  succeeds, and a read during the lock answers at once (WAL).

These tests can fail (checked by hand by patching the store): with the select-then-insert
get-or-create below, 12 to 26 of the 40 racing PostgreSQL calls raised IntegrityError in ten
runs (the control test keeps that check, with the two first lookers made to interleave); with SQLite's busy timeout and the store's retry
taken away (LOCK_WAIT_SECONDS = 0, lock_wait = 0) 26 of the 40 SQLite racers failed with
"database is locked", and the lock test failed at BEGIN IMMEDIATE with a 0.5 s busy timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from collections.abc import Sequence

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.conversation import Message, utcnow
from bot.storage.store import ConversationRow, MessageRow, Store

pytest_plugins = ["tests.pg"]

PER_STORE = 20


def _message(writer: int, i: int) -> Message:
    return Message(author_id=f"u{writer}", author_name=f"User{writer}", content=f"{writer}/{i}",
                   platform_id=str(10_000 * (writer + 1) + i))


async def _race(stores: Sequence[Store], key: str) -> list[object]:
    """PER_STORE first messages from each store at once, interleaved, for a conversation no
    one has seen yet; what each call returned or raised."""
    calls = [stores[w].add_message(key, _message(w, i), is_dm=(i == 3))
             for i in range(PER_STORE) for w in range(len(stores))]
    return await asyncio.gather(*calls, return_exceptions=True)


async def _rows(store: Store, key: str) -> tuple[int, int]:
    """How many conversations rows have this key, and how many messages they hold."""
    async with store.engine.connect() as connection:
        conversations = (await connection.execute(
            select(func.count()).select_from(ConversationRow).where(ConversationRow.key == key))).scalar_one()
        messages = (await connection.execute(
            select(func.count()).select_from(MessageRow)
            .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
            .where(ConversationRow.key == key))).scalar_one()
    return conversations, messages


async def _assert_race_is_clean(stores: Sequence[Store], key: str) -> None:
    results = await _race(stores, key)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors
    assert results == [True] * len(results)
    assert await _rows(stores[0], key) == (1, PER_STORE * len(stores))
    stored = await stores[1].recent_messages(key, 1000)
    assert sorted(m.content for m in stored) == sorted(f"{w}/{i}" for w in range(len(stores)) for i in range(PER_STORE))
    assert key in await stores[1].recovery_keys()  # one of the racers said it was a DM
    # Both see the same one conversation afterwards, and duplicates are still refused.
    assert not await stores[1].add_message(key, _message(0, 0))
    assert not await stores[0].add_message(key, _message(1, 0))


async def test_two_stores_race_first_messages_on_sqlite(database_url: str) -> None:
    first = await Store.open(database_url)
    second = await Store.open(database_url)  # its own engines: as another process would
    try:
        await _assert_race_is_clean([first, second], "race")
    finally:
        await first.close()
        await second.close()


async def test_two_stores_race_first_messages_on_postgres(postgres_url: str) -> None:
    first = await Store.open(postgres_url)
    second = await Store.open(postgres_url)
    try:
        await _assert_race_is_clean([first, second], "race")
        await _assert_race_is_clean([second, first], "race again")
    finally:
        await first.close()
        await second.close()


class _SelectThenInsert:
    """The get-or-create that the race tests must catch: look, then insert if absent.

    Left to timing, the race needs two transactions to look before either inserts, and on a
    slow host the first one can commit before the second looks (CI saw 40 of 40 succeed).
    So the first two lookers that find no row wait for each other (up to 10 s) before they
    insert: the interleaving the store's own get-or-create must survive, every run."""

    def __init__(self) -> None:
        self.found_none = 0
        self.both_looked = asyncio.Event()

    async def __call__(
        self, store: Store, session: AsyncSession, key: str, is_dm: bool = False, guild_id: str | None = None
    ) -> ConversationRow:
        row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
        if row is None:
            self.found_none += 1
            if self.found_none == 2:
                self.both_looked.set()
            if self.found_none <= 2:
                await asyncio.wait_for(self.both_looked.wait(), 10)
            row = ConversationRow(key=key, enabled=False, is_dm=is_dm, guild_id=guild_id, created_at=utcnow())
            session.add(row)
            await session.flush()
        return row


async def test_the_race_catches_a_select_then_insert_get_or_create(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: with a plain select-then-insert the same race on PostgreSQL fails (two
    transactions both see no row; the second insert violates the unique key), so the race
    test above can fail. On SQLite this naive version passes (BEGIN IMMEDIATE serializes
    whole write transactions); the SQLite race guards the lock handling between engines."""
    first = await Store.open(postgres_url)
    second = await Store.open(postgres_url)
    naive = _SelectThenInsert()
    monkeypatch.setattr(Store, "_conversation", lambda store, *args, **kwargs: naive(store, *args, **kwargs))
    try:
        results = await _race([first, second], "race")
        assert naive.found_none >= 2
        assert any(isinstance(r, IntegrityError) for r in results), results
    finally:
        await first.close()
        await second.close()


# Another process: takes SQLite's write lock, writes a row inside it, holds it, commits.
# It prints CLOCK_MONOTONIC times (shared by every process on the machine).
LOCK_HOLDER = r"""
import sqlite3, sys, time
path, hold = sys.argv[1], float(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
db.execute(
    "INSERT INTO messages (conversation_id, platform_id, author_id, author_name, is_bot, content, created_at)"
    " SELECT id, 'holder', 'h', 'Holder', 0, 'from the other process', '2026-11-26 00:00:00'"
    " FROM conversations WHERE key = 'c'"
)
print("locked", time.monotonic(), flush=True)
time.sleep(hold)
print("releasing", time.monotonic(), flush=True)
db.execute("COMMIT")
db.close()
"""
HOLD_SECONDS = 3.0


async def test_write_waits_out_another_process_lock_and_reads_go_on(database_url: str) -> None:
    path = database_url.split("///", 1)[1]
    store = await Store.open(database_url)
    holder = None
    try:
        await store.add_message("c", _message(0, 0))
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOCK_HOLDER, path, str(HOLD_SECONDS),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert holder.stdout is not None
        line = (await asyncio.wait_for(holder.stdout.readline(), 30)).decode().split()
        assert line and line[0] == "locked", (line, await holder.stderr.read() if holder.stderr else b"")
        locked_at = float(line[1])
        # The lock is real: a write from a plain connection gives up at once.
        other = sqlite3.connect(path, timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("INSERT INTO conversations (key, enabled, is_dm, created_at) VALUES ('x', 0, 0, '')")
        finally:
            other.close()

        started = time.monotonic()
        write = asyncio.create_task(store.add_message("c", _message(0, 1)))
        await asyncio.sleep(0.5)
        assert not write.done()  # waiting for the other process

        read_started = time.monotonic()
        during = await store.recent_messages("c", 10)
        state = await store.state("c")
        read_took = time.monotonic() - read_started
        assert read_took < HOLD_SECONDS / 3, read_took  # it did not wait for the lock (3 s)
        assert [m.content for m in during] == ["0/0"]  # neither pending write is visible yet
        assert state.known

        assert await asyncio.wait_for(write, HOLD_SECONDS + 30)
        done_at = time.monotonic()
        line = (await asyncio.wait_for(holder.stdout.readline(), 30)).decode().split()
        assert line and line[0] == "releasing", line
        released_at = float(line[1])
        assert await holder.wait() == 0
        # The write finished only after the other process let go, having waited the whole hold.
        assert done_at >= released_at
        assert done_at - started >= HOLD_SECONDS - (started - locked_at) - 0.05, (done_at - started, started - locked_at)
        assert [m.content for m in await store.recent_messages("c", 10)] == ["0/0", "from the other process", "0/1"]
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        await store.close()
