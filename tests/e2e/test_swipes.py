"""Swipes (◀ ▶ through a reply's alternatives, Regenerate adds one) and Continue (a button
and /continue), through real discord.py against the Discord stand-in."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import Harness, StartBot
from tests.e2e.fake_discord import FakeDiscord, User, wait_for
from tests.e2e.nothing_lost import assert_nothing_lost
from tests.e2e.store_waits import delivered_reply, stored, stored_reply

FINAL = ["Regenerate", "Continue"]


def labels(d: FakeDiscord, message_id: int) -> list[str]:
    return [c["label"] for row in d.messages[message_id]["components"] for c in row["components"]]


def disabled(d: FakeDiscord, message_id: int) -> list[str]:
    return [c["label"] for row in d.messages[message_id]["components"] for c in row["components"]
            if c.get("disabled")]


async def ask(h: Harness, text: str, answer: str) -> tuple[int, int]:
    """Ann asks in her DM; the question's id and its (final) reply's id."""
    d = h.discord
    h.engine.say(answer)
    question = await d.user_says(d.ann, d.dm, text)
    reply_id = int((await wait_for(lambda: d.replies_to(question)))[0]["id"])
    await wait_for(lambda: d.messages[reply_id]["content"] == answer and labels(d, reply_id) == FINAL)
    await delivered_reply(h, d.dm)  # until then a click is told "still being written"
    return question, reply_id


async def test_swipes_choose_the_reply_in_history_and_survive_a_restart(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    question, reply_id = await ask(h, "tell me about the sea", "First answer.")
    regen = f"hermes:regen:{d.ann.id}"

    h.engine.say("Second answer.", "Third answer.")
    await d.click(d.ann, reply_id, regen)
    await wait_for(lambda: d.messages[reply_id]["content"] == "Second answer." and "▶" in labels(d, reply_id))
    assert labels(d, reply_id) == ["◀", "2/2", "▶", *FINAL]
    await delivered_reply(h, d.dm)
    await d.click(d.ann, reply_id, regen)
    await wait_for(lambda: d.messages[reply_id]["content"] == "Third answer." and "3/3" in labels(d, reply_id))
    assert disabled(d, reply_id) == ["3/3", "▶"], "nothing after the newest"
    await delivered_reply(h, d.dm)

    # ◀ shows the second: in Discord, and as the stored reply (the one in history).
    click = await d.click(d.ann, reply_id, f"hermes:swipe:prev:{d.ann.id}")
    await wait_for(lambda: d.messages[reply_id]["content"] == "Second answer." and "2/3" in labels(d, reply_id))
    assert click.response_type == 6
    reply = await delivered_reply(h, d.dm)
    assert reply.content == "Second answer."
    assert await h.store.alternatives(reply.id) == ["First answer.", "Second answer.", "Third answer."]
    # Someone else may not swipe it.
    eve = await d.click(User(999, "Eve"), reply_id, f"hermes:swipe:next:{d.ann.id}")
    await wait_for(lambda: eve.response_type == 4)
    assert "Only the person who asked" in d.original(eve)["content"]
    assert d.messages[reply_id]["content"] == "Second answer."

    # After a restart the buttons still work and every alternative is there.
    await h.bot.close()
    h = await start_bot()
    await d.click(d.ann, reply_id, f"hermes:swipe:next:{d.ann.id}")
    await wait_for(lambda: d.messages[reply_id]["content"] == "Third answer." and "3/3" in labels(d, reply_id))
    await d.click(d.bob, reply_id, f"hermes:swipe:prev:{d.ann.id}")  # an admin may
    await wait_for(lambda: d.messages[reply_id]["content"] == "Second answer." and "2/3" in labels(d, reply_id))
    assert await h.store.alternatives(reply.id) == ["First answer.", "Second answer.", "Third answer."]

    # The next prompt continues from the one shown.
    _, newer_id = await ask(h, "and then?", "Then the tide.")
    prompt = h.engine.prompts[-1]
    assert "Second answer." in prompt and "Third answer." not in prompt and "First answer." not in prompt
    # Only the latest reply can be swiped now.
    late = await d.click(d.ann, reply_id, f"hermes:swipe:next:{d.ann.id}")
    await wait_for(lambda: late.response_type == 4)
    assert "Only the latest reply" in d.original(late)["content"]
    assert d.messages[reply_id]["content"] == "Second answer."
    history = await stored(h, d.dm, 4)
    assert [m.content for m in history] == ["tell me about the sea", "Second answer.", "and then?", "Then the tide."]
    await assert_nothing_lost(d, h.store, {d.dm: [question]})


async def test_continue_extends_the_reply_and_the_next_prompt_has_all_of_it(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    question, reply_id = await ask(h, "describe the sea", "The sea is wide")
    h.engine.say(" and deep.")
    click = await d.click(d.ann, reply_id, f"hermes:continue:{d.ann.id}")
    await wait_for(lambda: d.messages[reply_id]["content"] == "The sea is wide and deep." and labels(d, reply_id) == FINAL)
    assert click.response_type == 6
    continued = h.engine.prompts[-1]
    assert continued.endswith("### Response:\nThe sea is wide"), "the reply is left open, no new turn"
    assert (await delivered_reply(h, d.dm)).content == "The sea is wide and deep."

    # /continue works on the latest reply too.
    h.engine.say(" Ships sail on it.")
    command = await d.slash(d.ann, d.dm, "continue")
    await wait_for(lambda: command.response_type == 4)
    await wait_for(lambda: d.messages[reply_id]["content"] == "The sea is wide and deep. Ships sail on it.")
    _, _ = await ask(h, "and the sky?", "Blue.")
    assert "The sea is wide and deep. Ships sail on it.\n" in h.engine.prompts[-1]
    assert len(await stored(h, d.dm, 4)) == 4, "one reply, continued in place"
    late = await d.click(d.ann, reply_id, f"hermes:continue:{d.ann.id}")
    await wait_for(lambda: late.response_type == 4)
    assert "Only the latest reply" in d.original(late)["content"]
    await assert_nothing_lost(d, h.store, {d.dm: [question]})


async def test_a_continuation_past_2000_characters_adds_a_part(start_bot: StartBot) -> None:
    h = await start_bot()
    h.engine.delay = 0.0
    d = h.discord
    first = "word " * 380
    question, reply_id = await ask(h, "write a lot", first.strip())
    h.engine.say(" more" * 60)
    await d.click(d.ann, reply_id, f"hermes:continue:{d.ann.id}")
    await wait_for(lambda: len(d.bot_messages(d.dm)) == 2 and labels(d, reply_id) == FINAL)
    reply = await delivered_reply(h, d.dm)
    assert reply.content == (first + "more " * 60).strip()
    assert len(reply.part_ids) == 2 and int(reply.part_ids[0]) == reply_id
    shown = "".join(d.messages[int(p)]["content"] for p in reply.part_ids)
    assert shown.count("more") == 60 and shown.count("word") == 380
    await assert_nothing_lost(d, h.store, {d.dm: [question]})


async def test_stop_during_continue_keeps_the_text(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    question, reply_id = await ask(h, "a story", "Once upon a time")
    h.engine.delay = 0.05
    h.engine.say(" " + " ".join(f"then{i}" for i in range(200)))
    await d.click(d.ann, reply_id, f"hermes:continue:{d.ann.id}")
    await wait_for(lambda: "Stop" in labels(d, reply_id) and "then3" in d.messages[reply_id]["content"])
    stop = await d.click(d.ann, reply_id, f"hermes:stop:{d.ann.id}")
    await wait_for(lambda: stop.response_type == 6)
    await wait_for(lambda: labels(d, reply_id) == FINAL)
    shown = d.messages[reply_id]["content"]
    assert shown.startswith("Once upon a time then0") and shown.endswith("\n\n*(stopped)*")
    reply = await stored_reply(h, d.dm)
    assert reply.status == "stopped" and reply.content == shown.removesuffix("\n\n*(stopped)*")
    assert "then199" not in reply.content
    await assert_nothing_lost(d, h.store, {d.dm: [question]})


async def test_a_restart_mid_regeneration_keeps_the_earlier_alternative(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    question, reply_id = await ask(h, "a poem", "Roses are red.")
    h.engine.delay = 0.05
    h.engine.say(" ".join(f"verse{i}" for i in range(300)))
    await d.click(d.ann, reply_id, f"hermes:regen:{d.ann.id}")
    await wait_for(lambda: "Stop" in labels(d, reply_id) and "verse3" in d.messages[reply_id]["content"])
    await h.bot.close()  # gone mid-regeneration: the new take is cut off
    h = await start_bot()
    await wait_for(lambda: labels(d, reply_id) == ["◀", "2/2", "▶", *FINAL], timeout=30)
    reply = await stored_reply(h, d.dm)
    assert reply.content.startswith("verse0") and reply.status != "streaming"
    await d.click(d.ann, reply_id, f"hermes:swipe:prev:{d.ann.id}")
    await wait_for(lambda: d.messages[reply_id]["content"] == "Roses are red." and "1/2" in labels(d, reply_id))
    assert (await stored_reply(h, d.dm)).content == "Roses are red."
    await assert_nothing_lost(d, h.store, {d.dm: [question]})


async def test_a_continue_that_cannot_start_leaves_the_finished_reply_finished(
        start_bot: StartBot, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a hostile review: with the engine briefly unavailable, Continue turned a
    finished reply into `failed` (with a failure notice, out of the training export)."""
    from bot.engine.base import EngineError

    h = await start_bot()
    d = h.discord
    _, reply_id = await ask(h, "describe the sea", "The sea is wide and deep.")
    assert (await stored_reply(h, d.dm)).status == "done"
    h.engine.broken = EngineError("the model is being reloaded")
    await d.click(d.ann, reply_id, f"hermes:continue:{d.ann.id}")
    await wait_for(lambda: "cannot answer in" in caplog.text, timeout=30)  # the Continue ran and failed
    reply = await delivered_reply(h, d.dm, tries=300)
    h.engine.broken = None
    assert (reply.status, reply.content, reply.notice) == ("done", "The sea is wide and deep.", None)
    assert d.messages[reply_id]["content"] == "The sea is wide and deep."


SWIPE_EDIT = "/channels/{id}/messages/{id}"


async def test_a_redelivery_never_writes_an_older_copy_over_a_swipe(
        start_bot: StartBot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a hostile review: the periodic redelivery read a reply, then a swipe changed
    it, then the redelivery wrote its older copy back (store and Discord); the next swipe
    then saved that copy over the other take, which was lost for good."""
    from bot.edge import recovery

    monkeypatch.setattr(recovery, "REDELIVER_SECONDS", 3600.0)  # only the redelivery this test runs
    h = await start_bot(DELIVERY_RETRY_SECONDS="1")
    d = h.discord
    h.engine.say("Take A.")
    q = await d.user_says(d.ann, d.dm, "tell me")
    rid = int((await wait_for(lambda: d.replies_to(q)))[0]["id"])
    await wait_for(lambda: d.messages[rid]["content"] == "Take A." and labels(d, rid) == FINAL)
    await delivered_reply(h, d.dm)
    h.engine.say("Take B.")
    await d.click(d.ann, rid, f"hermes:regen:{d.ann.id}")
    await wait_for(lambda: d.messages[rid]["content"] == "Take B." and "2/2" in labels(d, rid))
    reply = await delivered_reply(h, d.dm)
    assert await h.store.alternatives(reply.id) == ["Take A.", "Take B."]

    # Discord has a bad moment: ◀ is stored (content A) but not shown yet: undelivered.
    d.fail_for("PATCH", SWIPE_EDIT, 503, 600)
    await d.click(d.ann, rid, f"hermes:swipe:prev:{d.ann.id}")
    for _ in range(600):  # the swipe's own delivery gives up (1 s of retries)
        r = await h.store.reply(reply.id)
        if r.content == "Take A." and r.undelivered:
            break
        await asyncio.sleep(0.05)
    chat = h.bot.get_cog("Chat")
    await wait_for(lambda: not chat.lanes.workers(), timeout=60)  # the swipe's delivery gave up
    d.clear_faults()  # Discord answers again
    r = await h.store.reply(reply.id)
    assert (r.content, r.undelivered) == ("Take A.", True)

    # The periodic redelivery takes its snapshot (A); its edit meets one more 503 and
    # retries, meanwhile Ann clicks ▶ (B), which is stored and shown.
    d.fail_next("PATCH", SWIPE_EDIT, 503)
    redelivery = asyncio.create_task(chat.recovery.redeliver())
    await asyncio.sleep(0.1)
    await d.click(d.ann, rid, f"hermes:swipe:next:{d.ann.id}")
    await redelivery
    await asyncio.sleep(0.5)
    await wait_for(lambda: not chat.lanes.workers(), timeout=60)  # the redelivery, then ▶, have run
    await wait_for(lambda: d.messages[rid]["content"] == "Take B.", timeout=10)
    r = await h.store.reply(reply.id)
    assert r.content == "Take B." and (await h.store.swipe_view(reply.id)).label == "2/2"
    assert await h.store.alternatives(reply.id) == ["Take A.", "Take B."], "no take lost"
