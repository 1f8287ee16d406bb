"""When the bot answers, what it stores, and how it replies — through the real discord.py."""

from __future__ import annotations

from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import wait_for
from tests.e2e.store_waits import stored


async def test_dm_is_answered_with_a_reply_that_pings_nobody(start_bot: StartBot) -> None:
    h = await start_bot()
    h.engine.say("Hello Ann! @everyone look, <@100000000000000002> and @here too.")
    d = h.discord
    question = await d.user_says(d.ann, d.dm, "hi there")
    replies = await wait_for(lambda: d.replies_to(question))
    reply = replies[0]
    await wait_for(lambda: "@here too." in d.messages[int(reply["id"])]["content"])
    final = d.messages[int(reply["id"])]
    assert final["mention_everyone"] is False and final["mentions"] == []
    assert d.dm in d.typing
    assert "Ann: hi there" in h.engine.prompts[0]
    history = await stored(h, d.dm, 2)
    assert [m.is_bot for m in history] == [False, True]
    assert history[1].content.startswith("Hello Ann!")
    assert history[1].platform_id == reply["id"]


async def test_guild_channel_needs_a_mention_or_reply(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("First answer.", "Second answer.")
    ignored = await d.user_says(d.ann, d.general, "just chatting")
    mention = await d.user_says(d.bob, d.general, "what do you think?", mention_bot=True)
    first = (await wait_for(lambda: d.replies_to(mention)))[0]
    await wait_for(lambda: d.messages[int(first["id"])]["content"] == "First answer.")
    assert d.replies_to(ignored) == []
    follow_up = await d.user_says(d.ann, d.general, "and why?", reply_to=int(first["id"]))
    second = (await wait_for(lambda: d.replies_to(follow_up)))[0]
    await wait_for(lambda: d.messages[int(second["id"])]["content"] == "Second answer.")
    # The mention reads as a name. The chat around it is read from Discord when answering
    # (the model sees it) but never stored: only what addresses the bot is kept.
    assert "Bob: @Hermes what do you think?" in h.engine.prompts[0]
    assert "Ann: just chatting\nBob: @Hermes what do you think?" in h.engine.prompts[0]
    assert "Ann: and why?" in h.engine.prompts[1] and "First answer." in h.engine.prompts[1]
    stored_texts = [m.content for m in await h.store.recent_messages(f"discord:{d.general}", 10)]
    assert "just chatting" not in stored_texts and "and why?" in stored_texts


async def test_other_bots_and_itself_are_ignored(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    from_bot = await d.user_says(d.other_bot, d.dm, "I am a bot", mention_bot=True)
    h.engine.say("ok")
    question = await d.user_says(d.ann, d.dm, "hello")
    await wait_for(lambda: d.replies_to(question))
    assert d.replies_to(from_bot) == []
    assert len(h.engine.prompts) == 1
