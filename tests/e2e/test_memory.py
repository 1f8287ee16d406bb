"""Long memory and the author's note through the real bot and the Discord stand-in: a long
DM in a small context gets a summary built in the background (the reply never waits for
it), the next prompt reads it before the recent turns; /memory show|clear; /note."""

from __future__ import annotations

import asyncio

from bot.core.conversation import Message
from bot.roleplay.memory import MEMORY_CONCURRENCY, SUMMARY_HEADING
from bot.core.prompt import INPUT, INSTRUCTION
from tests.e2e.conftest import StartBot
from bot.storage.store import Store
from tests.e2e.fake_discord import FakeDiscord, wait_for

SMALL = {"N_CTX": "700", "MAX_NEW_TOKENS": "64", "MEMORY_SUMMARY_WORDS": "30"}


async def long_dm(database_url: str, d: FakeDiscord, turns: int) -> str:
    """A DM with `turns` stored exchanges, written before the bot starts (older than anything
    Discord sends next; never an unanswered question for its recovery to pick up)."""
    key = f"discord:{d.dm}"
    store = await Store.open(database_url)
    for i in range(turns):
        await store.add_message(key, Message(str(d.ann.id), "Ann", f"Turn {i}: my ship's part number {i} is fine.",
                                             platform_id=str(1000 + 2 * i)), is_dm=True)
        await store.add_message(key, Message(str(d.bot_user.id), "Hermes", f"Good to know, part {i}.",
                                             is_bot=True, platform_id=str(1001 + 2 * i)), is_dm=True)
    await store.close()
    return key


async def test_a_long_conversation_gets_a_background_summary_read_before_the_recent_turns(
    start_bot: StartBot, fake_discord: FakeDiscord, database_url: str
) -> None:
    key = await long_dm(database_url, fake_discord, 20)
    h = await start_bot(**SMALL)
    d = h.discord
    memory = h.bot.responder.memory
    memory.debounce = 0.0
    for _ in range(MEMORY_CONCURRENCY):  # no summary may start until the reply is checked
        await memory._slots.acquire()
    h.engine.say("Sure, Ann.")
    question = await d.user_says(d.ann, d.dm, "is everything fine?")
    reply = (await wait_for(lambda: d.replies_to(question)))[0]
    await wait_for(lambda: d.messages[int(reply["id"])]["content"] == "Sure, Ann.")
    # The reply is whole while the summary waits: it is built in the background, after it.
    assert len(h.engine.prompts) == 1 and "Turn 0:" not in h.engine.prompts[0]
    assert key in memory._tasks
    h.engine.say("Ann keeps a ship; parts 0 to 7 are fine.", "Ann keeps a ship; parts 0 to 14 are fine.")
    for _ in range(MEMORY_CONCURRENCY):
        memory._slots.release()
    for _ in range(200):
        state = (await h.store.prompt_extras(key))[0]
        if state.summary.endswith("14 are fine."):
            break
        await asyncio.sleep(0.1)
    assert state.summary == "Ann keeps a ship; parts 0 to 14 are fine."
    # Two requests (the backlog is more than one can read in 700 tokens), oldest turns first.
    first_request, second_request = h.engine.prompts[1:]
    assert first_request.startswith(f"{INSTRUCTION}\nSummarize") and "Ann: Turn 0: my ship" in first_request
    assert "Summary so far:\nAnn keeps a ship; parts 0 to 7 are fine." in second_request

    h.engine.say("Yes, parts 0 to 14 are fine.")
    again = await d.user_says(d.ann, d.dm, "what do you remember?")
    await wait_for(lambda: d.replies_to(again))
    prompt = h.engine.prompts[-1]
    assert prompt.index(SUMMARY_HEADING) < prompt.index(INSTRUCTION)
    assert f"{SUMMARY_HEADING}\nAnn keeps a ship; parts 0 to 14 are fine." in prompt
    assert "Turn 0:" not in prompt and "Ann: what do you remember?" in prompt

    shown = await d.slash(d.ann, d.dm, "memory", sub="show")
    await wait_for(lambda: shown.response_type == 4)
    assert d.original(shown)["flags"] & 64 and "parts 0 to 14 are fine" in d.original(shown)["content"]
    cleared = await d.slash(d.ann, d.dm, "memory", sub="clear")  # anyone, in their own DM
    await wait_for(lambda: cleared.response_type == 4)
    assert "gone" in d.original(cleared)["content"]
    assert (await h.store.prompt_extras(key))[0].summary == ""
    empty = await d.slash(d.ann, d.dm, "memory", sub="show")
    await wait_for(lambda: empty.response_type == 4)
    assert "No summary yet" in d.original(empty)["content"]


async def test_memory_clear_and_the_note_need_manage_channels_in_a_server(start_bot: StartBot) -> None:
    h = await start_bot(**SMALL)
    d = h.discord
    for command, sub, options in (("memory", "clear", None), ("note", "set", {"text": "Be terse."})):
        refused = await d.slash(d.ann, d.thread, command, options, sub=sub)
        await wait_for(lambda refused=refused: refused.response_type == 4)
        assert d.original(refused)["flags"] & 64 and "Manage Channels" in d.original(refused)["content"]
    assert (await h.store.prompt_extras(f"discord:{d.thread}"))[1].text == ""
    allowed = await d.slash(d.bob, d.thread, "note", {"text": "Be terse.", "depth": 0}, sub="set")
    await wait_for(lambda: allowed.response_type == 4)
    assert (await h.store.prompt_extras(f"discord:{d.thread}"))[1].text == "Be terse."


async def test_the_authors_note_goes_in_at_its_depth_every_n_turns(start_bot: StartBot) -> None:
    h = await start_bot(**SMALL)
    d = h.discord
    note = await d.slash(d.ann, d.dm, "note", {"text": "{{char}} answers {{user}} in rhyme.", "depth": 1, "every": 2},
                         sub="set")
    await wait_for(lambda: note.response_type == 4)
    assert "every 2 turns" in d.original(note)["content"]
    h.engine.say("one", "two", "three")
    for n, text in enumerate(("first", "second", "third"), start=1):
        question = await d.user_says(d.ann, d.dm, text)
        await wait_for(lambda question=question: d.replies_to(question))
        await wait_for(lambda n=n: len(h.engine.prompts) == n)
    first, second, third = h.engine.prompts
    block = f"{INPUT}\nHermes answers Ann in rhyme.\n\n"
    assert block not in first and block not in third
    # Depth 1: before the last message (the question), after the reply before it.
    assert f"one\n\n{block}{INSTRUCTION}\nAnn: second" in second
    shown = await d.slash(d.ann, d.dm, "note", sub="show")
    await wait_for(lambda: shown.response_type == 4)
    assert "{{char}} answers {{user}} in rhyme." in d.original(shown)["content"]
    cleared = await d.slash(d.ann, d.dm, "note", sub="clear")
    await wait_for(lambda: cleared.response_type == 4)
    assert (await h.store.prompt_extras(f"discord:{d.dm}"))[1].text == ""
