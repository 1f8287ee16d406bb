"""Faults a real deployment meets, injected into the fake Discord and the database while the
real bot (discord.py, SQLite, the reply path) runs: nothing may be lost."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from bot.edge import recovery
from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import wait_for
from tests.e2e.nothing_lost import assert_nothing_lost, rows
from tests.e2e.store_waits import stored_containing

SEND = "/channels/{id}/messages"
EDIT = "/channels/{id}/messages/{id}"
STORY = " ".join(f"Word{i}." for i in range(80))


async def test_503_on_the_first_send_of_two_replies(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("First answer.", "Second answer.")
    d.fail_next("POST", SEND, 503)
    first = await d.user_says(d.ann, d.dm, "one")
    await wait_for(lambda: d.replies_to(first))
    d.fail_next("POST", SEND, 503, 503)
    second = await d.user_says(d.ann, d.dm, "two")
    await wait_for(lambda: d.replies_to(second))
    stored = await assert_nothing_lost(d, h.store, {d.dm: [first, second]})
    assert [r.content for r in stored[d.dm] if r.is_bot] == ["First answer.", "Second answer."]
    assert [f[2] for f in d.faults] == [503, 503, 503]


async def test_errors_and_dropped_connections_on_streaming_edits(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.delay = 0.03
    h.engine.say(STORY)
    d.fail_next("PATCH", EDIT, 503, 0, 500, 503)
    question = await d.user_says(d.ann, d.dm, "a story please")
    reply = (await wait_for(lambda: d.replies_to(question)))[0]
    await wait_for(lambda: d.messages[int(reply["id"])]["content"] == STORY, timeout=40)
    stored = await assert_nothing_lost(d, h.store, {d.dm: [question]})
    assert [r.content for r in stored[d.dm] if r.is_bot] == [STORY]
    assert len(d.faults) == 4


async def test_a_question_deleted_while_its_reply_waits_still_gets_the_reply(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.delay = 0.05
    h.engine.say(STORY, "The answer to the deleted question.")
    first = await d.user_says(d.ann, d.dm, "first")
    await wait_for(lambda: d.replies_to(first))
    second = await d.user_says(d.ann, d.dm, "second, soon deleted")
    await d.user_deletes(second)
    answer = await wait_for(lambda: [m for m in d.bot_messages(d.dm)
                                     if m["content"] == "The answer to the deleted question."], timeout=30)
    assert "message_reference" not in answer[0], "sent plainly, as Discord does with fail_if_not_exists=false"
    stored = await assert_nothing_lost(d, h.store, {d.dm: [first]})  # (the deleted one left history)
    assert stored[d.dm][-1].content == "The answer to the deleted question." and stored[d.dm][-1].status == "done"
    assert all(status < 500 for _, _, status in d.requests)


async def test_discord_down_longer_than_the_retries(start_bot: StartBot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sends fail for 4 s, the bot retries for 1 s: the reply is stored, then posted once
    Discord answers again."""
    monkeypatch.setattr(recovery, "REDELIVER_SECONDS", 0.5)
    h = await start_bot(DELIVERY_RETRY_SECONDS="1")
    d = h.discord
    h.engine.say("Stored while Discord was down.")
    d.fail_for("POST", SEND, 503, 4.0)
    question = await d.user_says(d.ann, d.dm, "are you there?")

    async def stored_undelivered() -> bool:
        return any(r.undelivered and r.content for r in await rows(h.store, d.dm))

    deadline = time.monotonic() + 10
    while not await stored_undelivered():
        assert time.monotonic() < deadline, "the reply was not stored while Discord was down"
        await asyncio.sleep(0.05)
    assert d.bot_messages(d.dm) == []
    reply = (await wait_for(lambda: d.replies_to(question), timeout=20))[0]
    assert reply["content"] == "Stored while Discord was down."
    await assert_nothing_lost(d, h.store, {d.dm: [question]})


async def test_a_database_locked_by_another_process_for_8_seconds(start_bot: StartBot, database_url: str) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("one", "two", "three")
    path = database_url.split("///", 1)[1]
    locker = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         f"db = sqlite3.connect({path!r}, isolation_level=None)\n"
         "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(8); db.execute('COMMIT')"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert locker.stdout is not None and (await asyncio.to_thread(locker.stdout.readline)).strip() == "locked"
        started = time.monotonic()
        dm = await d.user_says(d.ann, d.dm, "while the database is locked")
        mention = await d.user_says(d.bob, d.general, "me too", mention_bot=True)
        await wait_for(lambda: d.replies_to(dm) and d.replies_to(mention), timeout=40)
        waited = time.monotonic() - started
    finally:
        locker.wait(20)
    assert locker.returncode == 0
    assert waited > 6, f"answered after {waited:.1f} s: the lock was not held?"
    await assert_nothing_lost(d, h.store, {d.dm: [dm], d.general: [mention]})


async def test_eight_simultaneous_first_messages(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.delay = 0.0
    h.engine.say(*[f"answer {i}" for i in range(8)])
    people = [d.ann, d.bob, d.mod, d.owner]
    sent = await asyncio.gather(
        *[d.user_says(person, d.general, f"hello from {person.name}", mention_bot=True) for person in people],
        *[d.user_says(d.ann, d.dm, f"dm {i}") for i in range(4)],
    )
    stored = await assert_nothing_lost(d, h.store, {d.general: list(sent[:4]), d.dm: list(sent[4:])})
    assert sum(not r.is_bot for r in stored[d.general]) == 4 and sum(not r.is_bot for r in stored[d.dm]) == 4


async def test_a_busy_channel_gets_one_reply_for_what_was_said_meanwhile(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    await h.store.set_enabled(f"discord:{d.general}", True)
    h.engine.delay = 0.05
    h.engine.say(STORY, "One answer for all of you.")
    first = await d.user_says(d.ann, d.general, "start")
    await wait_for(lambda: d.replies_to(first))
    later = [await d.user_says(person, d.general, f"{person.name} adds something")
             for person in (d.bob, d.mod, d.owner, d.ann)]
    await wait_for(lambda: d.replies_to(later[-1]), timeout=30)
    await assert_nothing_lost(d, h.store, {d.general: [first, *later]})
    assert len(h.engine.prompts) == 2, "one generation for the four messages that came meanwhile"
    assert all(f"{p.name} adds something" in h.engine.prompts[1] for p in (d.bob, d.mod, d.owner, d.ann))
    assert all(not d.replies_to(m) for m in later[:-1]), "the reply references the latest message"


async def test_messages_during_a_gateway_outage_are_replayed_on_resume(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("Still here.")
    await d.close_gateway(4000)
    question = await d.user_says(d.ann, d.dm, "said while the gateway was down")
    await asyncio.wait_for(d.resumed.wait(), 20)
    await wait_for(lambda: d.replies_to(question))
    await assert_nothing_lost(d, h.store, {d.dm: [question]})


async def test_a_restart_back_fills_and_answers_once(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("Hello.")
    first = await d.user_says(d.ann, d.dm, "hi")
    reply = (await wait_for(lambda: d.replies_to(first)))[0]
    await wait_for(lambda: d.messages[int(reply["id"])]["content"] == "Hello." and
                   not d.messages[int(reply["id"])]["components"][0]["components"][0].get("disabled"))
    await h.bot.close()
    missed = [await d.user_says(d.ann, d.dm, f"while you were away {i}") for i in range(3)]
    h2 = await start_bot()
    h2.engine.say("Welcome back answer.")
    answer = (await wait_for(lambda: d.replies_to(missed[-1]), timeout=30))[0]
    await wait_for(lambda: d.messages[int(answer["id"])]["content"] == "Welcome back answer.")
    assert all(f"while you were away {i}" in h2.engine.prompts[0] for i in range(3))
    await assert_nothing_lost(d, h2.store, {d.dm: [first, *missed]})
    await h2.bot.close()
    h3 = await start_bot()
    await asyncio.sleep(2)
    assert h3.engine.prompts == [], "a question is answered once, not again at the next start"


# ---- found by a hostile review: each failed before its fix ------------------------------


async def test_a_403_on_an_edit_mid_stream_still_ends_the_reply(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.delay = 0.05
    h.engine.say(STORY)
    question = await d.user_says(d.ann, d.dm, "story")
    await wait_for(lambda: d.replies_to(question))
    d.fail_next("PATCH", EDIT, 403)
    await assert_nothing_lost(d, h.store, {d.dm: [question]}, timeout=30)


async def test_a_403_on_the_first_send_is_delivered_later(start_bot: StartBot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "REDELIVER_SECONDS", 0.5)
    h = await start_bot()
    d = h.discord
    h.engine.say("hello there")
    d.fail_next("POST", SEND, 403)
    question = await d.user_says(d.ann, d.dm, "hi")
    await assert_nothing_lost(d, h.store, {d.dm: [question]}, timeout=30)


async def test_a_mention_still_waiting_at_shutdown_is_answered_after_the_restart(start_bot: StartBot) -> None:
    h = await start_bot(SHUTDOWN_GRACE_SECONDS="5")
    d = h.discord
    h.engine.delay = 0.05
    h.engine.say(STORY)
    first = await d.user_says(d.ann, d.general, "tell a story", mention_bot=True)
    await wait_for(lambda: d.replies_to(first))
    waiting = await d.user_says(d.bob, d.general, "and me?", mention_bot=True)
    await stored_containing(h, d.general, "and me?")  # waiting: stored, behind the story
    await h.bot.shutdown()
    h2 = await start_bot()
    h2.engine.say("answer to Bob after the restart")
    await wait_for(lambda: d.replies_to(waiting), timeout=30)
    await assert_nothing_lost(d, h2.store, {d.general: [first, waiting]})


async def test_a_message_being_stored_when_shutdown_begins_is_stored_before_it_ends(
        start_bot: StartBot, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while a message Discord delivered is still being stored (a slow database):
    the shutdown waits for it, so the restart finds it and answers it. Before, the shutdown
    ended without it and the process exited: the message was in nobody's history."""
    h = await start_bot(SHUTDOWN_GRACE_SECONDS="5")
    d = h.discord
    add_message, storing = h.store.add_message, asyncio.Event()

    async def slow_add(key: str, message, *args, **kw):  # type: ignore[no-untyped-def]
        if message.content == "are you there?":
            storing.set()
            await asyncio.sleep(1.0)
        return await add_message(key, message, *args, **kw)

    monkeypatch.setattr(h.store, "add_message", slow_add)
    question = await d.user_says(d.ann, d.dm, "are you there?")
    await asyncio.wait_for(storing.wait(), 10)
    await h.bot.shutdown()
    assert "are you there?" in [m.content for m in await h.store.recent_messages(f"discord:{d.dm}", 10)]
    h2 = await start_bot()
    h2.engine.say("Here, after the restart.")
    await assert_nothing_lost(d, h2.store, {d.dm: [question]}, timeout=30)


async def test_a_crash_before_the_first_text_does_not_hide_what_was_said_meanwhile(start_bot: StartBot) -> None:
    from bot.core.conversation import Message

    h = await start_bot()
    d = h.discord
    h.engine.say("first answer")
    first = await d.user_says(d.ann, d.dm, "hello")
    await wait_for(lambda: d.replies_to(first))
    await assert_nothing_lost(d, h.store, {d.dm: [first]})
    await h.bot.close()
    # What a kill -9 during prefill leaves: the question stored, its reply begun, nothing shown.
    second = await d.user_says(d.ann, d.dm, "second question")
    key = f"discord:{d.dm}"
    await h.store.add_message(key, Message(str(d.ann.id), "Ann", "second question", platform_id=str(second)), is_dm=True)
    await h.store.begin_reply(key, author_id=str(d.bot_user.id), author_name="Hermes", reply_to=str(second),
                              requester_id=str(d.ann.id))
    meanwhile = await d.user_says(d.ann, d.dm, "hello? are you there?")
    h2 = await start_bot()
    h2.engine.say("answer after the restart")
    await assert_nothing_lost(d, h2.store, {d.dm: [first, second, meanwhile]}, timeout=30)


async def test_a_reply_deleted_while_it_streams_keeps_no_text(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.delay = 0.05
    h.engine.say(STORY)
    question = await d.user_says(d.ann, d.dm, "story")
    reply = (await wait_for(lambda: d.replies_to(question)))[0]
    await asyncio.sleep(0.5)
    await d.user_deletes(int(reply["id"]))

    async def finished() -> list:
        return [r for r in await rows(h.store, d.dm) if r.is_bot and r.status not in (None, "streaming")]

    deadline = time.monotonic() + 30
    while not (done := await finished()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert done[0].deleted and done[0].content == "", "the deleted reply's text is not stored again"


async def _crash_left(h, d, question_text: str, shown: list[str], stored_parts: int) -> tuple[int, list[int]]:  # type: ignore[no-untyped-def]
    """What a kill -9 leaves when Discord took a reply's parts but the store holds only the
    first `stored_parts` of their ids: the question stored, the reply `streaming`."""
    from bot.core.conversation import Message

    question = await d.user_says(d.ann, d.dm, question_text)
    key = f"discord:{d.dm}"
    await h.store.add_message(key, Message(str(d.ann.id), "Ann", question_text, platform_id=str(question)), is_dm=True)
    reply_id = await h.store.begin_reply(key, author_id=str(d.bot_user.id), author_name="Hermes",
                                         reply_to=str(question), requester_id=str(d.ann.id))
    parts = [d.bot_posted(d.dm, shown[0], reply_to=question, stop_for=d.ann.id)]
    parts += [d.bot_posted(d.dm, text) for text in shown[1:]]
    await h.store.update_reply(reply_id, "\n".join(shown), [str(p) for p in parts[:stored_parts]])
    return question, parts


@pytest.mark.parametrize("stored_parts", [0, 1])
async def test_parts_posted_just_before_a_crash_are_adopted_not_posted_again(start_bot: StartBot,
                                                                             stored_parts: int) -> None:
    """kill -9 between Discord taking a part and the store recording its id: recovery finds
    the part in the channel and makes it final (no second copy, no live Stop button)."""
    h = await start_bot()
    d = h.discord
    await h.bot.shutdown()  # its start-up recovery ends too (it must not answer what comes next)
    first_part = "A" * 1990
    question, parts = await _crash_left(h, d, "a long story", [first_part, "B" * 300], stored_parts)
    meanwhile = await d.user_says(d.ann, d.dm, "still there?")
    h2 = await start_bot()
    h2.engine.say("yes, back")
    await wait_for(lambda: d.replies_to(meanwhile), timeout=30)
    stored = await assert_nothing_lost(d, h2.store, {d.dm: [question, meanwhile]}, timeout=30)
    cut = next(r for r in stored[d.dm] if r.reply_to == str(question))
    assert [int(p) for p in cut.part_ids] == parts, "the orphan parts are the reply's, in order"
    assert len(d.replies_to(question)) == 1, "no second copy of the first part"
    assert not [m for m in d.bot_messages(d.dm) if int(m["id"]) > parts[-1] and "B" * 50 in m["content"]]
    assert "interrupted" in d.messages[parts[-1]]["content"]
    buttons = [c["label"] for row in d.messages[parts[0]]["components"] for c in row["components"]]
    assert buttons == ["Regenerate", "Continue"]
