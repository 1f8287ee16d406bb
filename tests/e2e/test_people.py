"""People: user personas (/me), text attachments as context, and when the bot speaks
unaddressed (/channel speak) — through real discord.py against the local Discord API."""

from __future__ import annotations

import asyncio

import discord
import pytest
from sqlalchemy import select

from bot.roleplay.attachments import MAX_FILE_BYTES
from bot.storage.store import MessageRow
from tests.e2e.conftest import Harness, StartBot
from tests.e2e.fake_discord import FakeDiscord, Interaction, User, wait_for
from tests.e2e.store_waits import stored

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


async def command(d: FakeDiscord, user: User, channel: int, command_name: str, sub: str | None = None,
                  **options: object) -> str:
    """Run a slash command and return what it answered."""
    interaction: Interaction = await d.slash(user, channel, command_name, options or None, sub=sub)
    await wait_for(lambda: interaction.response_type is not None and d.original(interaction) is not None)
    return str(d.original(interaction)["content"])  # type: ignore[index]


async def asks(h: Harness, user: User, channel: int, text: str, mention: bool = True, **extra: object) -> str:
    """`user` asks, the bot answers: the prompt the model got."""
    d = h.discord
    before = len(h.engine.prompts)  # type: ignore[attr-defined]
    question = await d.user_says(user, channel, text, mention_bot=mention, **extra)  # type: ignore[arg-type]
    await wait_for(lambda: any(m["author"]["id"] == str(d.bot_user.id) and not m["content"].startswith("*(")
                               for m in d.replies_to(question)))
    assert len(h.engine.prompts) == before + 1  # type: ignore[attr-defined]
    return h.engine.prompts[-1]  # type: ignore[attr-defined,no-any-return]


async def test_me_set_describes_the_person_in_the_prompt(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("Greetings, ranger.", "Hello again.", "Hi Bob.", "Hi.")
    said = await command(d, d.ann, d.general, "me", "set", description="{{user}} is a ranger who distrusts {{char}}.")
    assert "Saved in this server" in said
    prompt = await asks(h, d.ann, d.general, "who am I?")
    line = "[Ann: Ann is a ranger who distrusts Hermes.]"
    assert line in prompt and prompt.index(line) < prompt.index("### Instruction:")
    # Bob's default (set in a DM) applies in the server; the preamble keeps Ann's line first
    # and does not change when Bob is the one asking (prefix reuse).
    assert "everywhere" in await command(d, d.bob, d.dm, "me", "set", description="A quiet bard.")
    await asks(h, d.ann, d.general, "hello")
    bob_prompt = await asks(h, d.bob, d.general, "and me?")
    assert f"{line}\n[Bob: A quiet bard.]" in bob_prompt
    ann_prompt = await asks(h, d.ann, d.general, "us both")
    preamble = bob_prompt[:bob_prompt.index("### Instruction:")]
    assert ann_prompt.startswith(preamble), "the same preamble whoever asks"

    assert "ranger" in await command(d, d.ann, d.general, "me", "show")
    too_long = await command(d, d.ann, d.general, "me", "set", description="x" * 1001)
    assert "at most 1000" in too_long
    assert "Deleted your description in this server" in await command(d, d.ann, d.general, "me", "clear")
    assert "no description" in await command(d, d.ann, d.general, "me", "show")
    # /forget in a DM deletes the default too.
    await command(d, d.bob, d.dm, "forget")
    assert await h.store.user_persona(str(d.bob.id), "") is None


async def test_a_text_file_is_read_into_the_prompt_and_stored(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("It lists three tasks.")
    notes = "# Tasks\n- buy rope\n- caulk the hull\n- café for the crew\n".encode("cp1252")
    prompt = await asks(h, d.ann, d.dm, "what is in my notes?", mention=False,
                        attachments=[("notes.md", notes, "text/markdown")])
    block = "[file notes.md]\n# Tasks\n- buy rope\n- caulk the hull\n- café for the crew"
    assert f"Ann: what is in my notes?\n{block}" in prompt, "the file follows the question, decoded from cp1252"
    history = await stored(h, d.dm, 2)
    assert history[0].content == "what is in my notes?" and history[0].attachments == block


async def test_other_attachments_get_a_note_and_big_files_are_never_downloaded(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("Nice picture.")
    big = b"log line\n" * (10 * 1024 * 1024 // 9)  # 10 MB of text
    question = await d.user_says(d.ann, d.general, "look", mention_bot=True,
                                 attachments=[("photo.png", PNG, "image/png"), ("huge.log", big, "text/plain")])
    replies = await wait_for(lambda: len(d.replies_to(question)) >= 2 and d.replies_to(question))
    notice = next(m["content"] for m in replies if m["content"].startswith("*("))
    assert "photo.png, huge.log not read" in notice and f"{MAX_FILE_BYTES // 1024} KiB" in notice
    prompt = h.engine.prompts[-1]
    assert "[attachment photo.png: not read — the model reads text only]" in prompt
    assert "[attachment huge.log: not read — 10,240 KiB, over the 256 KiB limit for a file]" in prompt
    assert d.attachment_downloads == [], "neither file was downloaded: memory stays bounded"
    history = await stored(h, d.general, 2)
    assert "photo.png: not read" in history[0].attachments


async def test_reply_chance_follow_up_window_and_name_trigger(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say(*[f"reply {i}" for i in range(10)])
    refused = await command(d, d.ann, d.general, "channel", "speak", chance=100)
    assert "Manage Channels" in refused
    assert "100 % of messages" in await command(d, d.mod, d.general, "channel", "speak", chance=100)
    prompt = await asks(h, d.ann, d.general, "nice weather today", mention=False)
    assert "Ann: nice weather today" in prompt

    await command(d, d.mod, d.general, "channel", "speak", chance=0)
    quiet = await d.user_says(d.bob, d.general, "anyone around?")
    await asyncio.sleep(1.0)
    assert d.replies_to(quiet) == [], "0 %: an unaddressed message is not answered"
    assert all(m.content != "anyone around?" for m in await h.store.recent_messages(f"discord:{d.general}", 50)), \
        "nor stored"

    await command(d, d.mod, d.general, "channel", "speak", follow_up=60)
    await asks(h, d.ann, d.general, "tell me a joke")
    follow_up = await asks(h, d.ann, d.general, "another one", mention=False)
    assert "Ann: another one" in follow_up, "Ann's next message within the window is answered"
    other = await d.user_says(d.bob, d.general, "I am not in this")
    await asyncio.sleep(1.0)
    assert d.replies_to(other) == [], "only the person answered gets the window"

    settings = await command(d, d.mod, d.general, "channel", "speak", follow_up=0, name=True)
    assert "“Hermes”" in settings
    named = await asks(h, d.bob, d.general, "what does HERMES think?", mention=False)
    assert "Bob: what does HERMES think?" in named
    assert "Bob: I am not in this" in named, "the chat around it is read from Discord (not stored)"
    unnamed = await d.user_says(d.bob, d.general, "hermetic seals are neat")
    await asyncio.sleep(1.0)
    assert d.replies_to(unnamed) == [], "the name as a whole word only"


async def test_files_in_an_enabled_channel_and_missed_while_down_are_read(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    h.engine.say("Rope noted.", "Hello.")
    await command(d, d.mod, d.general, "channel", "enable")
    prompt = await asks(h, d.bob, d.general, "", mention=False, attachments=[("list.txt", b"rope\n", None)])
    assert "Bob: [file list.txt]\nrope" in prompt, "a file alone is the message"
    first = await d.user_says(d.ann, d.dm, "hi")

    def final(question: int) -> bool:
        replies = [m for m in d.replies_to(question) if m["author"]["id"] == str(d.bot_user.id)]
        return bool(replies) and replies[0]["content"] == "Hello." and not any(
            button.get("disabled") is False and button.get("label") == "Stop"
            for row in replies[0]["components"] for button in row["components"])

    await wait_for(lambda: final(first))
    await asyncio.sleep(0.5)
    await h.bot.close()
    missed = await d.user_says(d.ann, d.dm, "read this", attachments=[("todo.md", b"- caulk the hull", "text/markdown")])
    h2 = await start_bot()
    h2.engine.say("Welcome back: the hull.")
    await wait_for(lambda: any(m["author"]["id"] == str(d.bot_user.id) for m in d.replies_to(missed)), timeout=30)
    assert "Ann: read this\n[file todo.md]\n- caulk the hull" in h2.engine.prompts[0], "back-filled with its file"


async def test_a_message_deleted_while_its_file_downloads_keeps_no_file_text(start_bot: StartBot,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a hostile review: the file's text was written onto the deleted row."""
    gate = asyncio.Event()
    original = discord.Attachment.read

    async def slow(self, *args, **kwargs):  # the CDN is slow (a big file, a slow link)
        started.set()
        await gate.wait()
        return await original(self, *args, **kwargs)

    started = asyncio.Event()
    monkeypatch.setattr(discord.Attachment, "read", slow)
    h = await start_bot()
    d = h.discord
    h.engine.say("ok")
    question = await d.user_says(d.ann, d.dm, "see file", attachments=[("secret.txt", b"my password is hunter2", None)])

    async def row():
        async with h.store._sessions() as session:
            return await session.scalar(select(MessageRow).where(MessageRow.platform_id == str(question)))

    for _ in range(100):
        if (r := await row()) is not None:
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(started.wait(), 10)
    await d.user_deletes(question)  # Ann deletes it while the file downloads
    for _ in range(100):
        if (r := await row()).deleted_at is not None:
            break
        await asyncio.sleep(0.05)
    gate.set()
    for _ in range(100):
        if (r := await row()).attachments:
            break
        await asyncio.sleep(0.05)
    assert r.deleted_at is not None
    assert not r.attachments or "hunter2" not in r.attachments, "the deleted message's file text is stored"


async def test_an_answer_waits_for_the_files_of_the_messages_before_it(start_bot: StartBot,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a hostile review: a message with a file slow to download, then another one
    at once: the file's message was queued only once read, so the other one's answer went
    first, built without the file (and then covered the first, which got no answer)."""
    gate, started = asyncio.Event(), asyncio.Event()
    original = discord.Attachment.read

    async def slow(self: discord.Attachment, *args: object, **kwargs: object) -> bytes:
        started.set()
        await gate.wait()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(discord.Attachment, "read", slow)
    h = await start_bot()
    d = h.discord
    h.engine.say("Read it.", "It says 0000.")
    await d.user_says(d.ann, d.dm, "here are my notes", attachments=[("notes.md", b"the launch code is 0000", None)])
    await asyncio.wait_for(started.wait(), 10)
    second = await d.user_says(d.ann, d.dm, "what do my notes say?")
    await asyncio.sleep(0.5)
    assert h.engine.prompts == [], "no prompt is built while a file before it is still being read"
    gate.set()
    await wait_for(lambda: d.replies_to(second), timeout=30)
    assert h.engine.prompts and all("the launch code is 0000" in prompt for prompt in h.engine.prompts)
