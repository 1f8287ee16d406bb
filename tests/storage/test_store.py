"""History on a real SQLite file with the real Alembic migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import event, text

from bot.storage import migrate
from bot.core.conversation import Message
from bot.storage.store import Store


def sqlite_path(database_url: str) -> str:
    return database_url.split("///", 1)[1]


def test_upgrade_and_downgrade_on_a_real_file(database_url: str) -> None:
    migrate.upgrade(database_url)
    with sqlite3.connect(sqlite_path(database_url)) as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        indexes = {r[0] for r in db.execute("select name from sqlite_master where type='index'")}
        assert db.execute("select version_num from alembic_version").fetchone() == ("0006",)
        message_columns = {r[1] for r in db.execute("pragma table_info(messages)")}
    assert {"conversations", "messages", "imported_personas", "scene_members", "reply_alternatives",
            "user_personas"} <= tables
    assert {"persona", "attachments", "swipe"} <= message_columns
    migrate.downgrade(database_url, "0005")
    with sqlite3.connect(sqlite_path(database_url)) as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        assert "swipe" not in {r[1] for r in db.execute("pragma table_info(messages)")}
    assert "scene_members" not in tables and "user_personas" not in tables
    assert {"ix_messages_conversation_id_id", "ix_messages_reply_status", "ix_messages_undelivered"} <= indexes
    assert {"reply_status", "part_ids", "notice", "undelivered", "reply_to", "requester_id"} <= message_columns
    migrate.downgrade(database_url, "0002")
    with sqlite3.connect(sqlite_path(database_url)) as db:
        assert "reply_status" not in {r[1] for r in db.execute("pragma table_info(messages)")}
    migrate.downgrade(database_url, "0001")
    with sqlite3.connect(sqlite_path(database_url)) as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert "imported_personas" not in tables and "messages" in tables
    migrate.downgrade(database_url, "base")
    with sqlite3.connect(sqlite_path(database_url)) as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert tables == {"alembic_version"}
    migrate.upgrade(database_url)  # and back up again


async def test_open_migrates_and_uses_wal(store: Store, database_url: str) -> None:
    async with store.engine.connect() as connection:
        mode = (await connection.execute(text("PRAGMA journal_mode"))).scalar()
    assert mode == "wal"
    assert Path(sqlite_path(database_url)).exists()


def msg(i: int, *, bot: bool = False) -> Message:
    return Message(
        author_id="b" if bot else f"u{i % 3}",
        author_name="Hermes" if bot else f"User{i % 3}",
        content=f"message {i}",
        is_bot=bot,
        platform_id=str(1000 + i),
    )


async def test_messages_round_trip_in_order(store: Store) -> None:
    for i in range(5):
        await store.add_message("c1", msg(i, bot=i == 2))
    await store.add_message("c2", msg(99))
    recent = await store.recent_messages("c1", limit=3)
    assert [m.content for m in recent] == ["message 2", "message 3", "message 4"]
    assert recent[0].is_bot and recent[0].author_name == "Hermes"
    assert recent[1].author_name == "User0" and recent[1].platform_id == "1003"
    assert recent[0].created_at.tzinfo is not None
    assert [m.content for m in await store.recent_messages("c2", 10)] == ["message 99"]
    assert await store.recent_messages("nobody", 10) == []


async def test_duplicate_platform_id_is_stored_once(store: Store) -> None:
    assert await store.add_message("c", msg(1))
    assert not await store.add_message("c", msg(1))
    assert len(await store.recent_messages("c", 10)) == 1


async def test_edit_and_delete_change_what_is_read(store: Store) -> None:
    for i in range(3):
        await store.add_message("c", msg(i))
    assert await store.edit_message("c", "1001", "edited text")
    assert await store.delete_message("c", "1000")
    assert not await store.delete_message("c", "424242")
    assert [m.content for m in await store.recent_messages("c", 10)] == ["edited text", "message 2"]


async def test_reset_forgets_and_survives_reopen(database_url: str) -> None:
    store = await Store.open(database_url)
    await store.add_message("c", msg(1))
    await store.reset("c")
    await store.add_message("c", msg(2))
    await store.set_persona("c", "marlowe")
    await store.set_enabled("c", True)
    await store.close()

    reopened = await Store.open(database_url)
    assert [m.content for m in await reopened.recent_messages("c", 10)] == ["message 2"]
    state = await reopened.state("c")
    assert state.persona == "marlowe" and state.enabled
    assert await reopened.enabled_keys() == {"c"}
    await reopened.save_imported_persona("vex", {"name": "Vex"}, "vex.png", "42")
    await reopened.save_imported_persona("vex", {"name": "Vex 2"}, "vex2.png", "42")
    assert await reopened.imported_personas() == {"vex": {"name": "Vex 2"}}
    await reopened.close()


async def test_recent_window_is_an_index_range_scan(store: Store) -> None:
    """The store's own window query walks the (conversation_id, id) index backwards and
    stops at the limit: no table scan and no sort, so its cost does not grow with history."""
    for i in range(50):
        await store.add_message("c", msg(i))
    await store.reset("c")
    await store.add_message("c", msg(51))
    captured: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "FROM messages" in statement:
            captured.append((statement, parameters))

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    assert [m.content for m in await store.recent_messages("c", 20)] == ["message 51"]
    event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    (statement, parameters), = captured
    async with store.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        cursor = await raw.driver_connection.execute("EXPLAIN QUERY PLAN " + statement, parameters)
        details = " | ".join(row[-1] for row in await cursor.fetchall())
    assert "ix_messages_conversation_id_id" in details, details
    assert "TEMP B-TREE" not in details, details


async def test_recovery_reads_back_from_a_persons_message_and_finds_active_conversations(store: Store) -> None:
    from datetime import UTC, datetime, timedelta

    await store.add_message("c", msg(1))
    await store.add_message("c", msg(2, bot=True))  # posted by the bot after the person (e.g. a notice)
    assert await store.newest_platform_id("c") == 1001, "the bot's own message does not move the cursor"
    await store.add_message("old", Message("u", "U", "long ago", platform_id="5",
                                           created_at=datetime.now(UTC) - timedelta(hours=2)))
    assert await store.active_keys(datetime.now(UTC) - timedelta(minutes=5)) == ["c"]


async def test_a_reply_deleted_while_it_streams_keeps_no_text(store: Store) -> None:
    await store.set_enabled("c", False)  # the conversation exists (a reply never creates one)
    reply = await store.begin_reply("c", author_id="b", author_name="Hermes", reply_to="1", requester_id="2")
    await store.update_reply(reply, "first words", ["900"])
    assert await store.delete_message("c", "900")
    await store.update_reply(reply, "first words and more", ["900"])
    await store.finish_reply(reply, "done", "first words and more, the end", None)
    stored = await store.reply(reply)
    assert stored is not None and stored.content == "", "the tombstone stays without text"


async def test_leaving_a_server_deletes_the_cards_imported_there(store: Store) -> None:
    """Found by a hostile review: purge_guild left the server's imported cards behind."""
    card = {"name": "Nyx", "description": "a ghost"}
    for key in ("g500/nyx", "g5000/nyx", "u500/nyx"):
        await store.save_imported_persona(key, card, "nyx.json", "42")
    await store.purge_guild("500")
    assert set(await store.imported_personas()) == {"g5000/nyx", "u500/nyx"}


async def test_a_reply_never_creates_its_conversation(store: Store) -> None:
    """Found by a hostile review: the bot was removed from a server while a scene's second
    character waited; its reply re-created the purged conversation (without its server id,
    so no later purge could find it)."""
    from bot.storage.store import ConversationGone

    await store.add_message("discord:5", Message("1", "Ann", "hi", platform_id="1"), guild_id="500")
    assert await store.purge_guild("500") == 1
    with pytest.raises(ConversationGone):
        await store.begin_reply("discord:5", author_id="b", author_name="Vex", reply_to="1", requester_id="1")
    assert await store.recent_messages("discord:5", 10) == [] and not (await store.state("discord:5")).known
