"""A deletion Discord reports before the store holds the message: kept a while, applied
when the message (or the reply part) is stored."""

from __future__ import annotations

from bot.core.conversation import Message
from bot.storage.late_deletions import LateDeletions
from bot.storage.store import Store


def test_ids_are_taken_once_and_forgotten_after_their_time_or_past_the_limit() -> None:
    now = [0.0]
    late = LateDeletions(keep_seconds=10, limit=3, clock=lambda: now[0])
    late.add("1")
    late.add("2")
    assert late.take(["2", "9", None, "2"]) == ["2"] and late.take(["2"]) == []
    now[0] = 11
    late.add("3")
    assert late.take(["1"]) == [] and len(late) == 1  # "1" outlived its 10 s
    for i in range(4, 8):
        late.add(str(i))
    assert len(late) == 3 and late.take(["3", "4", "5", "6", "7"]) == ["5", "6", "7"]


async def test_a_message_deleted_before_it_was_stored_is_stored_without_its_text(store: Store) -> None:
    key = "discord:1"
    await store.add_message(key, Message("u", "Ann", "kept", platform_id="10"))
    assert not await store.delete_message(key, "11")  # Discord's event came first
    assert await store.add_message(key, Message("u", "Ann", "deleted at once", platform_id="11"))
    assert [m.content for m in await store.recent_messages(key, 10)] == ["kept"]
    assert not await store.add_message(key, Message("u", "Ann", "deleted at once", platform_id="11"))  # still one row


async def test_a_reply_part_deleted_before_its_id_was_stored_erases_the_reply(store: Store) -> None:
    key = "discord:2"
    await store.add_message(key, Message("u", "Ann", "write a lot", platform_id="20"))
    reply_id = await store.begin_reply(key, author_id="b", author_name="Hermes", reply_to="20", requester_id="u")
    await store.update_reply(reply_id, "first part … second part", ["21"])
    await store.delete_message(key, "22")  # the second part, before Discord's answer carried its id
    await store.set_part_ids(reply_id, ["21", "22"])
    await store.mark_delivered(reply_id, "first part … second part", ["21", "22"])
    assert [m.content for m in await store.recent_messages(key, 10)] == ["write a lot"]
