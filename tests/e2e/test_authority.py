"""Authority is scoped: a server's admins govern their server, only the bot's owners govern
the bot — through real discord.py against the stand-in, with a second server owned by a
stranger."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import wait_for

MANAGE_CHANNELS, ADMINISTRATOR = 1 << 4, 1 << 3


async def test_another_servers_administrator_cannot_reload_the_model(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    attempt = await d.slash(d.stranger, d.other_general, "reload-model", options={"model": "any.gguf"})
    await wait_for(lambda: attempt.response_type == 4)
    assert "Only the bot's owners" in d.original(attempt)["content"]
    assert h.engine.info.name == "scripted", "nothing was reloaded"


async def test_commands_declare_who_may_see_them(start_bot: StartBot) -> None:
    h = await start_bot()
    commands = {c["name"]: c for c in h.discord.commands}
    assert int(commands["reload-model"]["default_member_permissions"]) == ADMINISTRATOR
    assert int(commands["channel"]["default_member_permissions"]) == MANAGE_CHANNELS
    assert commands["channel"].get("dm_permission") is False or commands["channel"].get("contexts") == [0]
    assert commands["status"].get("default_member_permissions") is None, "anyone may ask for /status"


async def import_card(d, who, name: str, card: bytes) -> str:  # type: ignore[no-untyped-def]
    """`/persona import` one card in #general; the bot's answer to it."""
    before = len(d.followups)
    interaction = await d.slash(who, d.general, "persona", sub="import", files={"card": (f"{name}.png", card)})
    await wait_for(lambda: interaction.response_type == 4 or len(d.followups) > before)
    return d.original(interaction)["content"] if interaction.response_type == 4 else d.followups[-1]["content"]


async def test_an_owner_imports_many_cards_and_refused_imports_never_count(start_bot: StartBot) -> None:
    from tests.card_files import png, png_card, v3_card

    h = await start_bot(CARD_IMPORTS_PER_10_MINUTES="2")
    d = h.discord
    # The application's owner sets up a roleplay server: a bad card, then five in a row.
    assert "can't import" in await import_card(d, d.owner, "bad", png({"chara": b"%%%"}))
    for i in range(5):
        answer = await import_card(d, d.owner, f"c{i}", png_card(v3_card(name=f"Owner Card {i}")))
        assert f"Imported **Owner Card {i}**" in answer, answer
    # A server manager who is no owner: refused cards do not count, two imports are a burst
    # (CARD_IMPORTS_PER_10_MINUTES=2), the third is asked to wait.
    for bad in range(3):
        assert "can't import" in await import_card(d, d.mod, f"bad{bad}", png({"chara": b"%%%"}))
    for i in range(2):
        answer = await import_card(d, d.mod, f"m{i}", png_card(v3_card(name=f"Mod Card {i}")))
        assert f"Imported **Mod Card {i}**" in answer, answer
    slow = await import_card(d, d.mod, "m2", png_card(v3_card(name="Mod Card 2")))
    assert "Slow down" in slow and "imported 2 cards in the last 10 minutes" in slow, slow
    assert not [key for key in h.bot.responder.personas if key.endswith("/mod-card-2")], "not imported"
    assert len([key for key in h.bot.responder.personas if "-card-" in key]) == 7


async def test_allowed_guild_ids_leaves_other_servers_and_ignores_them(start_bot: StartBot) -> None:
    from tests.e2e.fake_discord import GUILD2_ID, GUILD_ID

    h = await start_bot(ALLOWED_GUILD_IDS=str(GUILD_ID))
    d = h.discord
    await wait_for(lambda: d.left_guilds == [GUILD2_ID])
    h.engine.say("hello home")
    ignored = await d.user_says(d.stranger, d.other_general, "hi bot", mention_bot=True)
    home = await d.user_says(d.ann, d.general, "hi bot", mention_bot=True)
    await wait_for(lambda: d.replies_to(home))
    assert not d.replies_to(ignored)
    assert await h.store.recent_messages(f"discord:{d.other_general}", 10) == [], "nothing stored from there"
    status = await d.slash(d.stranger, d.other_general, "status")
    await wait_for(lambda: status.response_type == 4)
    assert "can't use this command here" in d.original(status)["content"]


async def test_two_bots_do_not_answer_each_other_forever(start_bot: StartBot) -> None:
    h = await start_bot(REPLY_TO_BOTS="true", BOT_REPLY_LIMIT="2")
    d = h.discord
    h.engine.delay = 0.0
    h.engine.say(*[f"answer {i}" for i in range(10)])
    for i in range(4):
        said = await d.user_says(d.other_bot, d.general, f"bot says {i}", mention_bot=True)
        if i < 2:
            await wait_for(lambda: d.replies_to(said))
    await asyncio.sleep(1.0)
    assert len(h.engine.prompts) == 2, "the third and fourth bot messages in a row got no answer"
    person = await d.user_says(d.ann, d.general, "a person speaks", mention_bot=True)
    await wait_for(lambda: d.replies_to(person))
    again = await d.user_says(d.other_bot, d.general, "bot again", mention_bot=True)
    await wait_for(lambda: d.replies_to(again))


async def test_one_person_cannot_flood_the_bot(start_bot: StartBot) -> None:
    h = await start_bot(USER_MESSAGES_PER_MINUTE="2")
    d = h.discord
    h.engine.delay = 0.0
    h.engine.say("one", "two", "three")
    asked = []
    for i in range(3):
        asked.append(await d.user_says(d.bob, d.general, f"question {i}", mention_bot=True))
        await wait_for(lambda: d.replies_to(asked[-1]))
    told = d.replies_to(asked[2])[0]["content"]
    assert "slow down" in told and "saved" in told
    history = await h.store.recent_messages(f"discord:{d.general}", 10)
    assert "question 2" in [m.content.split("> ")[-1] for m in history][-1] or any(
        "question 2" in m.content for m in history), "the message is stored all the same"
    other = await d.user_says(d.ann, d.general, "my turn", mention_bot=True)
    await wait_for(lambda: d.replies_to(other))
    assert d.replies_to(other)[0]["content"] != told, "another person is not limited"
