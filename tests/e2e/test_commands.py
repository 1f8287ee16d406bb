"""Slash commands through the real discord.py app_commands against the local Discord API."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from bot.engine.scheduler import BatchConfig, BatchedEngine
from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import GUILD_ID, wait_for
from tests.e2e.store_waits import stored, stored_containing


async def test_reset_forgets_and_survives_restart(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("Noted.")
    question = await d.user_says(d.ann, d.dm, "my secret is 42")
    await wait_for(lambda: d.replies_to(question))
    await stored(h, d.dm, 2)
    reset = await d.slash(d.ann, d.dm, "reset")
    await wait_for(lambda: reset.response_type == 4)
    assert "forgotten" in d.original(reset)["content"]
    await h.bot.close()

    h2 = await start_bot()
    h2.engine.say("What secret?")
    again = await d.user_says(d.ann, d.dm, "what is my secret?")
    await wait_for(lambda: d.replies_to(again))
    assert "42" not in h2.engine.prompts[0]
    assert "Ann: what is my secret?" in h2.engine.prompts[0]


async def test_history_survives_a_restart(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("Nice to meet you, Ann.")
    first = await d.user_says(d.ann, d.dm, "I am Ann and I like sailing")
    reply = (await wait_for(lambda: d.replies_to(first)))[0]
    await wait_for(lambda: d.messages[int(reply["id"])]["content"] == "Nice to meet you, Ann.")
    await stored(h, d.dm, 2)
    await h.bot.close()
    h2 = await start_bot()
    h2.engine.say("You like sailing.")
    second = await d.user_says(d.ann, d.dm, "what do I like?")
    await wait_for(lambda: d.replies_to(second))
    prompt = h2.engine.prompts[0]
    assert "Ann: I am Ann and I like sailing" in prompt and "Nice to meet you, Ann." in prompt


async def test_edits_and_deletions_change_the_stored_history(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("ok", "ok again", "yes")
    wrong = await d.user_says(d.ann, d.dm, "the capital of France is Lyon")
    await wait_for(lambda: d.replies_to(wrong))
    oops = await d.user_says(d.ann, d.dm, "something rude")
    await wait_for(lambda: d.replies_to(oops))
    await stored(h, d.dm, 4)
    await d.user_edits(wrong, "the capital of France is Paris")
    await d.user_deletes(oops)
    for _ in range(100):
        contents = [m.content for m in await h.store.recent_messages(f"discord:{d.dm}", 10)]
        if "something rude" not in contents and "the capital of France is Paris" in contents:
            break
        await asyncio.sleep(0.05)
    assert contents == ["the capital of France is Paris", "ok", "ok again"]
    question = await d.user_says(d.ann, d.dm, "right?")
    await wait_for(lambda: d.replies_to(question))
    assert "Lyon" not in h.engine.prompts[-1] and "rude" not in h.engine.prompts[-1]
    assert "Ann: the capital of France is Paris" in h.engine.prompts[-1]


async def test_channel_enable_needs_manage_channels_and_then_every_message_is_answered(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    refused = await d.slash(d.ann, d.thread, "channel", sub="enable")
    await wait_for(lambda: refused.response_type == 4)
    assert "Manage Channels" in d.original(refused)["content"]
    assert d.original(refused)["flags"] & 64, "refusals are ephemeral"
    enabled = await d.slash(d.mod, d.thread, "channel", sub="enable")
    await wait_for(lambda: enabled.response_type == 4)
    h.engine.say("In the thread!")
    message = await d.user_says(d.bob, d.thread, "no mention needed")
    await wait_for(lambda: d.replies_to(message))
    disabled = await d.slash(d.mod, d.thread, "channel", sub="disable")
    await wait_for(lambda: disabled.response_type == 4)
    ignored = await d.user_says(d.bob, d.thread, "now I am ignored")
    await asyncio.sleep(0.5)
    assert d.replies_to(ignored) == []
    history = await stored(h, d.thread, 2)
    assert "now I am ignored" not in [m.content for m in history], "privacy: not addressed, not kept"


async def test_persona_set_greets_and_plays_the_character(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    refused = await d.slash(d.ann, d.general, "persona", sub="set", options={"name": "marlowe"})
    await wait_for(lambda: refused.response_type == 4)
    assert "Manage Channels" in d.original(refused)["content"]
    complete = await d.slash(d.mod, d.general, "persona", sub="set", options={"name": "mar"}, autocomplete="name")
    await wait_for(lambda: complete.choices is not None)
    assert [c["value"] for c in complete.choices] == ["marlowe"]
    chosen = await d.slash(d.mod, d.general, "persona", sub="set", options={"name": "marlowe"})
    await wait_for(lambda: chosen.response_type == 4)
    assert d.original(chosen)["content"].startswith("*Marlowe doesn't look up")
    await stored_containing(h, d.general, "Marlowe doesn't look up")
    # The greeting's id comes with Discord's answer to the command: no second request that
    # could fail after it was shown.
    assert not [r for r in d.requests if r[0] == "GET" and r[1].endswith("/messages/@original")]
    h.engine.say("Trouble, then.")
    question = await d.user_says(d.ann, d.general, "I have a case", mention_bot=True)
    await wait_for(lambda: d.replies_to(question))
    prompt = h.engine.prompts[0]
    assert "world-weary private detective" in prompt
    assert "### Response:\nMarlowe: *Marlowe doesn't look up" in prompt
    assert prompt.endswith("### Response:\nMarlowe: ")
    assert "Not sent to the model" not in prompt  # creator_notes
    show = await d.slash(d.ann, d.general, "persona", sub="show")
    await wait_for(lambda: show.response_type == 4)
    assert "Marlowe" in d.original(show)["content"]


async def test_status_and_queue(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.delay = 0.05
    h.engine.say("one " * 30, "two")
    first = await d.user_says(d.ann, d.dm, "first")
    await wait_for(lambda: d.replies_to(first))  # the first is being written
    second = await d.user_says(d.bob, d.general, "second", mention_bot=True)
    notice = await wait_for(lambda: d.replies_to(second))
    assert "queued: 1 request ahead of you" in d.history[int(notice[0]["id"])][0]
    await wait_for(lambda: d.messages[int(notice[0]["id"])]["content"] == "two")
    status = await d.slash(d.ann, d.dm, "status")
    await wait_for(lambda: status.response_type == 4)
    text = d.original(status)["content"]
    assert "**Model:** scripted" in text and "tokens/s" in text and "**Queue:** 0 waiting" in text
    assert d.replies_to(first)


@pytest.mark.llama
async def test_reload_model_with_the_real_batched_engine(start_bot: StartBot, gguf_path: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(gguf_path, models / "good.gguf")
    (models / "corrupt.gguf").write_bytes(gguf_path.read_bytes()[:3_000_000])
    engine = await BatchedEngine.start(BatchConfig(gguf_path, n_ctx=2048, n_parallel=2, n_gpu_layers=0))
    try:
        # Bob and Mod are bot admins (ADMIN_USER_IDS), Owner owns the application: owners
        # have no reload cooldown, a refused reload least of all.
        h = await start_bot(engine=engine, TEMPERATURE="0", MAX_NEW_TOKENS="24",
                            ADMIN_USER_IDS="100000000000000002,100000000000000003")
        d = h.discord
        # A full path through the real model: a DM answered by llama.cpp.
        question = await d.user_says(d.ann, d.dm, "Name three colours.")
        reply = (await wait_for(lambda: d.replies_to(question), timeout=60))[0]
        await stored(h, d.dm, 2)
        assert d.messages[int(reply["id"])]["content"].strip()

        non_admin = await d.slash(d.ann, d.dm, "reload-model", options={"model": "good.gguf"})
        await wait_for(lambda: non_admin.response_type == 4)
        assert "Only the bot's owners" in d.original(non_admin)["content"]

        escape = await d.slash(d.bob, d.dm, "reload-model", options={"model": "../../etc/passwd.gguf"})
        await wait_for(lambda: escape.response_type == 4)
        assert "only files under MODELS_DIR" in d.original(escape)["content"]
        for _ in range(2):  # right after the refused one, and twice in a row
            valid = await d.slash(d.bob, d.dm, "reload-model", options={"model": "good.gguf"})
            await wait_for(lambda: "Now serving `good`" in (d.original(valid) or {}).get("content", ""), timeout=60)

        corrupt = await d.slash(d.mod, d.general, "reload-model", options={"model": "corrupt.gguf"})
        await wait_for(lambda: "Still serving" in (d.original(corrupt) or {}).get("content", ""), timeout=60)
        assert corrupt.response_type == 5, "deferred within Discord's 3 seconds"
        assert engine.info.name == "good"
        still = await d.user_says(d.ann, d.dm, "Still there?")
        await wait_for(lambda: d.replies_to(still), timeout=60)

        complete = await d.slash(d.owner, d.general, "reload-model", options={"model": "go"}, autocomplete="model")
        await wait_for(lambda: complete.choices is not None)
        assert [c["value"] for c in complete.choices] == ["good.gguf"]
        good = await d.slash(d.owner, d.general, "reload-model", options={"model": "good.gguf"})  # app owner
        await wait_for(lambda: "Now serving `good`" in (d.original(good) or {}).get("content", ""), timeout=60)
        assert engine.info.name == "good"
        after = await d.user_says(d.ann, d.dm, "And now?")
        await wait_for(lambda: d.replies_to(after), timeout=60)
        assert not [r for r in d.requests if r[2] == 404 and "/callback" in r[1]], "no interaction expired"
    finally:
        await engine.close()


async def test_persona_import_from_an_attachment(start_bot: StartBot) -> None:
    from tests.card_files import png, png_card, v3_card

    h = await start_bot()
    d = h.discord
    # (Owner tries the hostile card: imports have a per-person cooldown, Mod imports below.)
    hostile = await d.slash(d.owner, d.general, "persona", sub="import", files={"card": ("evil.png", png({"chara": b"%%%"}))})
    await wait_for(lambda: d.followups and "can't import evil.png" in d.followups[-1]["content"])
    assert hostile.response_type == 5 and "evil" not in h.bot.responder.personas
    refused = await d.slash(d.ann, d.general, "persona", sub="import", files={"card": ("x.png", png_card(v3_card()))})
    await wait_for(lambda: refused.response_type == 4)
    assert "Manage Channels" in d.original(refused)["content"]

    imported = await d.slash(d.mod, d.general, "persona", sub="import",
                             files={"card": ("vex.png", png_card(v3_card(name="Nova Vex")))})
    await wait_for(lambda: any("Imported **Nova Vex** as `nova-vex`" in m["content"] for m in d.followups))
    assert imported.response_type == 5
    chosen = await d.slash(d.mod, d.general, "persona", sub="set", options={"name": "nova-vex", "greeting": 1})
    await wait_for(lambda: chosen.response_type == 4)
    assert d.original(chosen)["content"] == "Strap in, Mod!"
    await stored_containing(h, d.general, "Strap in, Mod!")
    await h.bot.close()

    h2 = await start_bot()  # the import survives a restart
    assert h2.bot.responder.personas[f"g{GUILD_ID}/nova-vex"].source == "imported"
    h2.engine.say("Hold on to something.")
    question = await d.user_says(d.ann, d.general, "is the reactor ok?", mention_bot=True)
    await wait_for(lambda: d.replies_to(question))
    prompt = h2.engine.prompts[0]
    assert "### Response:\nNova Vex: Strap in, Mod!" in prompt
    assert "unstable above 90% power" in prompt and prompt.endswith("Nova Vex: ")


async def test_a_failing_command_answers_briefly_and_logs_the_error(
    start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    h = await start_bot()
    d = h.discord

    h.engine.broken = RuntimeError("disk on fire")
    with caplog.at_level(logging.ERROR, logger="bot.edge.bot"):
        status = await d.slash(d.ann, d.dm, "status")
        await wait_for(lambda: status.response_type == 4)
    answer = d.original(status)
    assert answer["flags"] & 64 and "went wrong" in answer["content"] and "disk on fire" not in answer["content"]
    assert "disk on fire" in caplog.text and "/status failed" in caplog.text


async def test_a_queued_reply_shows_its_place_as_the_queue_moves(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.delay = 0.1
    h.engine.say("one " * 25, "two " * 25, "three")
    first = await d.user_says(d.ann, d.dm, "first")
    await wait_for(lambda: d.replies_to(first))
    second = await d.user_says(d.bob, d.general, "second", mention_bot=True)
    await wait_for(lambda: d.replies_to(second))  # queued in this order
    third = await d.user_says(d.mod, d.random, "third", mention_bot=True)
    notice = await wait_for(lambda: d.replies_to(third))
    notice_id = int(notice[0]["id"])
    await wait_for(lambda: d.messages[notice_id]["content"] == "three", timeout=30)
    versions = d.history[notice_id]
    assert versions[0] == "*(queued: 2 requests ahead of you)*"
    assert "*(queued: 1 request ahead of you)*" in versions
    assert d.replies_to(second) and d.rate_limited == []
