"""The store on a real PostgreSQL 15 server (asyncpg), through `Store.open` and the real
Alembic migrations: the same behaviour as on SQLite (tests/storage/test_store.py), the reply
lifecycle, and what PostgreSQL enforces that SQLite lets pass (types, lengths, time zones)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from bot.storage import migrate
from bot.core.conversation import DONE, FAILED, INTERRUPTED, STOPPED, STREAMING, Message
from bot.storage.store import Base, Store
from tests.storage.test_store import msg

pytest_plugins = ["tests.pg"]


@pytest.fixture
async def pg_store(postgres_url: str) -> AsyncIterator[Store]:
    store = await Store.open(postgres_url)
    yield store
    await store.close()


async def _schema(url: str) -> dict[str, object]:
    """Tables, their columns and indexes, and the Alembic revision, as PostgreSQL reports them."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:

            def read(sync_connection):  # type: ignore[no-untyped-def]
                inspector = inspect(sync_connection)
                tables = set(inspector.get_table_names())
                return {
                    "tables": tables,
                    "columns": {t: {c["name"]: c for c in inspector.get_columns(t)} for t in tables},
                    "indexes": {i["name"] for t in tables for i in inspector.get_indexes(t)},
                    "unique": {u["name"] for t in tables for u in inspector.get_unique_constraints(t)},
                }

            schema = await connection.run_sync(read)
            if "alembic_version" in schema["tables"]:
                schema["revision"] = (await connection.execute(text("select version_num from alembic_version"))).scalar()
    finally:
        await engine.dispose()
    return schema


def _head(url: str) -> str | None:
    return ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()


async def test_migrations_up_down_up(postgres_url: str) -> None:
    """Up to head, down step by step through 0003, 0002, 0001 to nothing, and up again."""
    await asyncio.to_thread(migrate.upgrade, postgres_url)
    schema = await _schema(postgres_url)
    assert schema["revision"] == _head(postgres_url)
    assert {"conversations", "messages", "imported_personas", "alembic_version"} <= schema["tables"]
    assert {"ix_messages_conversation_id_id", "ix_messages_reply_status", "ix_messages_undelivered"} <= schema["indexes"]
    assert "uq_messages_conversation_platform" in schema["unique"]
    messages = schema["columns"]["messages"]
    assert {"reply_status", "part_ids", "notice", "undelivered", "reply_to", "requester_id"} <= set(messages)
    # 64-bit ids on PostgreSQL (SQLite gets its INTEGER PRIMARY KEY), time zones kept.
    assert str(messages["id"]["type"]) == "BIGINT" and str(messages["conversation_id"]["type"]) == "BIGINT"
    assert str(schema["columns"]["conversations"]["forget_before_id"]["type"]) == "BIGINT"
    assert messages["created_at"]["type"].timezone
    assert not messages["undelivered"]["nullable"]

    await asyncio.to_thread(migrate.downgrade, postgres_url, "0002")
    schema = await _schema(postgres_url)
    assert schema["revision"] == "0002"
    assert "reply_status" not in schema["columns"]["messages"]
    assert "is_dm" not in schema["columns"]["conversations"]
    assert "ix_messages_undelivered" not in schema["indexes"]
    await asyncio.to_thread(migrate.downgrade, postgres_url, "0001")
    schema = await _schema(postgres_url)
    assert "imported_personas" not in schema["tables"] and "messages" in schema["tables"]
    await asyncio.to_thread(migrate.downgrade, postgres_url, "base")
    assert (await _schema(postgres_url))["tables"] == {"alembic_version"}

    # Up again, and the store works on the result.
    store = await Store.open(postgres_url)
    try:
        assert (await _schema(postgres_url))["revision"] == _head(postgres_url)
        assert await store.add_message("c", msg(1))
        assert [m.content for m in await store.recent_messages("c", 10)] == ["message 1"]
    finally:
        await store.close()


async def test_migrations_match_the_models(pg_store: Store) -> None:
    """Alembic's autogenerate finds nothing to change between the migrated database and
    the ORM models: the migrations build on PostgreSQL exactly what the store declares."""
    async with pg_store.engine.connect() as connection:
        diff = await connection.run_sync(
            lambda sync_connection: compare_metadata(MigrationContext.configure(sync_connection), Base.metadata)
        )
    assert diff == []


async def test_messages_round_trip_in_order(pg_store: Store) -> None:
    for i in range(5):
        await pg_store.add_message("c1", msg(i, bot=i == 2))
    await pg_store.add_message("c2", msg(99))
    recent = await pg_store.recent_messages("c1", limit=3)
    assert [m.content for m in recent] == ["message 2", "message 3", "message 4"]
    assert recent[0].is_bot and recent[0].author_name == "Hermes"
    assert recent[1].author_name == "User0" and recent[1].platform_id == "1003"
    assert [m.content for m in await pg_store.recent_messages("c1", 100)] == [f"message {i}" for i in range(5)]
    assert [m.content for m in await pg_store.recent_messages("c2", 10)] == ["message 99"]
    assert await pg_store.recent_messages("nobody", 10) == []


async def test_times_keep_their_instant_and_zone(pg_store: Store) -> None:
    """TIMESTAMPTZ: an aware time comes back as the same instant, aware, to the microsecond,
    whatever zone it was written in."""
    written = datetime(2026, 11, 26, 21, 5, 7, 123456, tzinfo=UTC)
    other_zone = written.astimezone(timezone(timedelta(hours=-5)))
    await pg_store.add_message("c", Message("u", "U", "one", platform_id="1", created_at=written))
    await pg_store.add_message("c", Message("u", "U", "two", platform_id="2", created_at=other_zone))
    first, second = await pg_store.recent_messages("c", 10)
    assert first.created_at == written and first.created_at.tzinfo is not None
    assert second.created_at == written


async def test_duplicate_platform_id_is_stored_once(pg_store: Store) -> None:
    assert await pg_store.add_message("c", msg(1))
    assert not await pg_store.add_message("c", msg(1))
    assert await pg_store.add_message("other", msg(1))  # unique per conversation only
    # Messages without a platform id (terminal chat) never collide.
    assert await pg_store.add_message("c", Message("u", "U", "a"))
    assert await pg_store.add_message("c", Message("u", "U", "b"))
    assert [m.content for m in await pg_store.recent_messages("c", 10)] == ["message 1", "a", "b"]


async def test_edit_and_delete_change_what_is_read(pg_store: Store) -> None:
    for i in range(3):
        await pg_store.add_message("c", msg(i))
    assert await pg_store.edit_message("c", "1001", "edited text")
    assert await pg_store.delete_message("c", "1000")
    assert not await pg_store.delete_message("c", "424242")
    assert not await pg_store.edit_message("no such conversation", "1001", "x")
    assert [m.content for m in await pg_store.recent_messages("c", 10)] == ["edited text", "message 2"]


async def test_reset_forgets_and_survives_reopen(postgres_url: str) -> None:
    store = await Store.open(postgres_url)
    await store.add_message("c", msg(1))
    await store.reset("c")
    await store.reset("fresh")  # a reset of a conversation never seen: nothing to forget
    await store.add_message("c", msg(2))
    await store.add_message("fresh", msg(3))
    await store.set_persona("c", "marlowe")
    await store.set_enabled("c", True)
    await store.close()

    reopened = await Store.open(postgres_url)  # migrations already at head: a no-op
    try:
        assert [m.content for m in await reopened.recent_messages("c", 10)] == ["message 2"]
        assert [m.content for m in await reopened.recent_messages("fresh", 10)] == ["message 3"]
        state = await reopened.state("c")
        assert state.persona == "marlowe" and state.enabled and state.known
        assert not (await reopened.state("unknown")).known
        assert await reopened.enabled_keys() == {"c"}
        await reopened.set_persona("c", None)
        assert (await reopened.state("c")).persona is None
        await reopened.save_imported_persona("vex", {"name": "Vex"}, "vex.png", "42")
        await reopened.save_imported_persona("vex", {"name": "Vex 2", "tags": ["ü", "🙂"]}, "vex2.png", "42")
        assert await reopened.imported_personas() == {"vex": {"name": "Vex 2", "tags": ["ü", "🙂"]}}
    finally:
        await reopened.close()


async def _begin(store: Store, key: str, reply_to: str | None = "1000") -> int:
    await store.set_enabled(key, False)  # the conversation exists (a reply never creates one)
    return await store.begin_reply(key, author_id="b", author_name="Hermes", reply_to=reply_to, requester_id="u1")


async def test_reply_lifecycle(pg_store: Store) -> None:
    await pg_store.add_message("c", msg(0))
    reply_id = await _begin(pg_store, "c")
    assert isinstance(reply_id, int)
    begun = await pg_store.reply(reply_id)
    assert begun is not None
    assert (begun.status, begun.content, begun.part_ids, begun.undelivered) == (STREAMING, "", (), False)
    assert (begun.key, begun.reply_to, begun.requester_id, begun.author_name) == ("c", "1000", "u1", "Hermes")
    # A reply with no text yet never reaches the prompt.
    assert [m.content for m in await pg_store.recent_messages("c", 10)] == ["message 0"]

    await pg_store.update_reply(reply_id, "Hello", ["5001"])
    await pg_store.update_reply(reply_id, "Hello there, " + "x" * 2500, ["5001", "5002"])
    shown = await pg_store.reply(reply_id)
    assert shown is not None and shown.part_ids == ("5001", "5002") and shown.status == STREAMING
    found = await pg_store.reply_by_part("c", "5001")
    assert found is not None and found.id == reply_id
    assert await pg_store.reply_by_part("c", "5002") is None  # only the first part names it
    assert await pg_store.reply_by_part("other", "5001") is None
    assert await pg_store.reply_by_part("c", "1000") is None  # a person's message is no reply
    assert await pg_store.undelivered_replies() == []  # still streaming

    with pytest.raises(ValueError):
        await pg_store.finish_reply(reply_id, STREAMING, "x", None)
    await pg_store.finish_reply(reply_id, STOPPED, "Hello there", "stopped by u1")
    finished = await pg_store.reply(reply_id)
    assert finished is not None
    assert (finished.status, finished.content, finished.notice, finished.undelivered) == (
        STOPPED, "Hello there", "stopped by u1", True)
    assert [r.id for r in await pg_store.undelivered_replies()] == [reply_id]

    await pg_store.mark_delivered(reply_id, "Hello there", ["5001"])
    delivered = await pg_store.reply(reply_id)
    assert delivered is not None and not delivered.undelivered and delivered.part_ids == ("5001",)
    assert await pg_store.undelivered_replies() == []
    recent = await pg_store.recent_messages("c", 10)
    assert [(m.content, m.is_bot, m.platform_id) for m in recent] == [
        ("message 0", False, "1000"), ("Hello there", True, "5001")]
    # Discord deletes the reply's message: the reply leaves the prompt.
    assert await pg_store.delete_message("c", "5001")
    assert [m.content for m in await pg_store.recent_messages("c", 10)] == ["message 0"]

    # A Regenerate queued before the deletion: it streams again from nothing, in the same
    # parts, but the deleted reply stays deleted (Discord shows none of it): no text comes back.
    await pg_store.restart_reply(reply_id, "Marlowe")
    again = await pg_store.reply(reply_id)
    assert again is not None
    assert (again.status, again.content, again.notice, again.author_name, again.part_ids) == (
        STREAMING, "", None, "Marlowe", ("5001",))
    await pg_store.update_reply(reply_id, "Second take", ["5001"])
    await pg_store.finish_reply(reply_id, DONE, "Second take", None)
    await pg_store.mark_delivered(reply_id, "Second take", ["5001"])
    assert [m.content for m in await pg_store.recent_messages("c", 10)] == ["message 0"]
    assert (await pg_store.reply(reply_id)).content == ""  # type: ignore[union-attr]
    assert await pg_store.reply(reply_id + 1000) is None


async def test_failed_reply_with_only_a_notice_stays_out_of_the_prompt(pg_store: Store) -> None:
    reply_id = await _begin(pg_store, "c")
    await pg_store.finish_reply(reply_id, FAILED, "", "the model failed")
    await pg_store.mark_delivered(reply_id, "", ["7001"])
    assert await pg_store.recent_messages("c", 10) == []
    stored = await pg_store.reply_by_part("c", "7001")
    assert stored is not None and stored.status == FAILED and stored.notice == "the model failed"


async def test_interrupt_streaming_after_a_crash(pg_store: Store) -> None:
    first = await _begin(pg_store, "a")
    await pg_store.update_reply(first, "half an ans", ["6001"])
    second = await _begin(pg_store, "b", reply_to=None)
    done = await _begin(pg_store, "a")
    await pg_store.finish_reply(done, DONE, "complete", None)
    await pg_store.mark_delivered(done, "complete", ["6002"])

    assert await pg_store.interrupt_streaming("interrupted by a restart") == 2
    assert await pg_store.interrupt_streaming("again") == 0
    undelivered = await pg_store.undelivered_replies()
    assert [(r.id, r.key, r.status, r.notice) for r in undelivered] == [
        (first, "a", INTERRUPTED, "interrupted by a restart"),
        (second, "b", INTERRUPTED, "interrupted by a restart"),
    ]
    assert undelivered[0].content == "half an ans" and undelivered[0].part_ids == ("6001",)
    assert [r.id for r in await pg_store.undelivered_replies(limit=1)] == [first]
    finished = await pg_store.reply(done)
    assert finished is not None and finished.status == DONE and not finished.undelivered


async def test_recovery_keys_newest_platform_id_and_unanswered(pg_store: Store) -> None:
    start = datetime.now(UTC)
    await pg_store.add_message("channel", msg(1))
    await pg_store.set_enabled("channel", True)
    await pg_store.add_message("dm", msg(2), is_dm=True)
    await pg_store.add_message("quiet", msg(3))
    await pg_store.add_message("later-dm", msg(4))
    await pg_store.add_message("later-dm", msg(5), is_dm=True)  # marks a known conversation a DM
    await pg_store.set_enabled("off", False)
    assert sorted(await pg_store.recovery_keys()) == ["channel", "dm", "later-dm"]

    # Numbers, not strings: "999" < "1000" as text; ids that are not numbers are ignored.
    await pg_store.add_message("ids", Message("u", "U", "x", platform_id="999"))
    await pg_store.add_message("ids", Message("u", "U", "y", platform_id="1000"))
    await pg_store.add_message("ids", Message("u", "U", "z", platform_id="terminal-1"))
    await pg_store.add_message("ids", Message("u", "U", "w"))
    assert await pg_store.newest_platform_id("ids") == 1000
    assert await pg_store.newest_platform_id("nowhere") is None
    # The window counts rows with a platform id; the newest of them is no number.
    assert await pg_store.newest_platform_id("ids", window=1) is None
    assert await pg_store.newest_platform_id("ids", window=2) == 1000

    # The newest message is a person's, within the window: unanswered.
    question = await pg_store.unanswered("channel", since=start)
    assert question is not None and question.content == "message 1"
    assert await pg_store.unanswered("channel", since=datetime.now(UTC) + timedelta(seconds=1)) is None
    assert await pg_store.unanswered("nowhere", since=start) is None
    # A reply follows it: answered (even a reply still streaming).
    reply_id = await _begin(pg_store, "channel", reply_to="1001")
    assert await pg_store.unanswered("channel", since=start) is None
    await pg_store.finish_reply(reply_id, DONE, "answer", None)
    assert await pg_store.unanswered("channel", since=start) is None
    # A newer question, then the newest message is deleted: the question before it counts.
    await pg_store.add_message("channel", msg(7))
    await pg_store.add_message("channel", msg(8))
    await pg_store.delete_message("channel", "1008")
    question = await pg_store.unanswered("channel", since=start)
    assert question is not None and question.platform_id == "1007"


@pytest.fixture(params=["postgresql", "sqlite"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    url = request.getfixturevalue("postgres_url" if request.param == "postgresql" else "database_url")
    store = await Store.open(url)
    yield store
    await store.close()


async def test_text_postgresql_refuses_is_cleaned_the_same_everywhere(any_store: Store) -> None:
    """PostgreSQL's text types refuse NUL characters (a model's <0x00> byte token or a
    message can carry one) and it enforces VARCHAR lengths (a character card's name may be
    longer than author_name's 200). SQLite took both as they were; on PostgreSQL the reply,
    or the message, failed to store. Now both drop the NULs and cut the name, alike."""
    store = any_store
    assert await store.add_message("c", Message("u", "U\x00ser", "a\x00b", platform_id="1"))
    reply_id = await store.begin_reply("c", author_id="b", author_name="N" * 250, reply_to="1", requester_id="u")
    await store.update_reply(reply_id, "so\x00far", ["2"])
    await store.finish_reply(reply_id, DONE, "fin\x00al", "no\x00te")
    await store.mark_delivered(reply_id, "fin\x00al", ["2"])
    assert await store.edit_message("c", "1", "ed\x00ited")
    long_name = Message("u", "L" * 300, "long name", platform_id="3")
    assert await store.add_message("c", long_name)
    recent = await store.recent_messages("c", 10)
    assert [(m.author_name, m.content) for m in recent] == [("User", "edited"), ("N" * 200, "final"), ("L" * 200, "long name")]
    reply = await store.reply(reply_id)
    assert reply is not None and reply.notice == "note" and reply.author_name == "N" * 200
    await store.restart_reply(reply_id, "M" * 201)
    assert (restarted := await store.reply(reply_id)) is not None and restarted.author_name == "M" * 200
