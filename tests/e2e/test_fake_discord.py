"""The fake Discord server itself, checked through the real discord.py client: outages, reply
references, channel history, gateway RESUME, the second server, webhooks; and the real bot
process (`python -m bot` with the small real GGUF) connecting, answering, crashing and
coming back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import discord
import pytest
from discord import app_commands

from bot.edge.bot import point_discord_at
from tests.e2e.bot_process import BotProcess, bot_env
from tests.e2e.fake_discord import BOT_ID, GUILD2_ID, GUILD_ID, FakeDiscord, wait_for

SEND = "/channels/{id}/messages"
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
EDIT = "/channels/{id}/messages/{id}"


class Client(discord.Client):
    """A plain discord.py client that remembers what it was sent."""

    def __init__(self) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(intents=intents, guild_ready_timeout=0.1)
        self.tree = app_commands.CommandTree(self)
        self.received: list[discord.Message] = []
        self._contents: list[str] = []  # as received: discord.py updates cached messages on edits
        self.resumes = 0

    async def on_message(self, message: discord.Message) -> None:
        self.received.append(message)
        self._contents.append(message.content)

    async def on_resumed(self) -> None:
        self.resumes += 1

    def contents(self) -> list[str]:
        return list(self._contents)


@pytest.fixture
async def client(fake_discord: FakeDiscord) -> AsyncIterator[Client]:
    point_discord_at(fake_discord.api_base, fake_discord.gateway_url)
    client = Client()
    task = asyncio.create_task(client.start("fake-token"))
    await asyncio.wait_for(client.wait_until_ready(), 20)
    yield client
    await client.close()
    await asyncio.gather(task, return_exceptions=True)


def channel(client: Client, channel_id: int) -> discord.TextChannel:
    found = client.get_channel(channel_id)
    assert isinstance(found, discord.TextChannel)
    return found


# ---- injected HTTP faults ------------------------------------------------------------------


async def test_503_on_a_send_raises_at_once_and_creates_nothing(fake_discord: FakeDiscord, client: Client) -> None:
    fake_discord.fail_next("POST", SEND, 503)
    started = time.monotonic()
    with pytest.raises(discord.DiscordServerError) as raised:
        await channel(client, fake_discord.general).send("hello")
    assert time.monotonic() - started < 0.5  # discord.py does not retry a 503: the bot must
    assert raised.value.status == 503
    assert "upstream connect error" in raised.value.text
    assert fake_discord.faults == [("POST", SEND, 503)]
    assert fake_discord.bot_messages(fake_discord.general) == []
    sent = await channel(client, fake_discord.general).send("hello again")  # the fault was used up
    assert [m["content"] for m in fake_discord.bot_messages(fake_discord.general)] == ["hello again"]
    assert sent.content == "hello again"


async def test_500_and_502_are_retried_by_discord_py(fake_discord: FakeDiscord, client: Client) -> None:
    general = channel(client, fake_discord.general)
    fake_discord.fail_next("POST", SEND, 500)
    await general.send("first")
    sent = await general.send("to edit")
    fake_discord.fail_next("PATCH", EDIT, 502)
    await sent.edit(content="edited")
    assert fake_discord.faults == [("POST", SEND, 500), ("PATCH", EDIT, 502)]
    assert [m["content"] for m in fake_discord.bot_messages(fake_discord.general)] == ["first", "edited"]
    assert fake_discord.history[sent.id] == ["to edit", "edited"]  # the failed PATCH changed nothing


async def test_a_late_answer_takes_effect_first(fake_discord: FakeDiscord, client: Client) -> None:
    general = channel(client, fake_discord.general)
    sent = await general.send("to edit")
    fake_discord.answer_late("PATCH", EDIT, 0.4)
    started = time.monotonic()
    edit = asyncio.create_task(sent.edit(content="edited"))
    await wait_for(lambda: fake_discord.messages[sent.id]["content"] == "edited")
    assert not edit.done()  # people see the edit; the bot has no answer yet
    await edit
    assert time.monotonic() - started >= 0.4
    fake_discord.clear_faults()
    fake_discord.answer_late("PATCH", EDIT, 30)
    other = await asyncio.wait_for(general.send("posts are on time"), 10)  # only the route given is late
    fake_discord.clear_faults()
    await asyncio.wait_for(other.edit(content="edits on time again"), 10)


async def test_a_dropped_connection_raises_a_connection_error(fake_discord: FakeDiscord, client: Client) -> None:
    general = channel(client, fake_discord.general)
    fake_discord.fail_next("POST", SEND, 0)
    with pytest.raises(aiohttp.ClientOSError) as raised:  # [Errno 104] Connection reset by peer
        await general.send("lost")
    assert isinstance(raised.value, OSError) and not isinstance(raised.value, discord.HTTPException)
    assert fake_discord.bot_messages(fake_discord.general) == []
    # aiohttp itself retries an idempotent request (GET, PUT, DELETE) once on a reset.
    question = await fake_discord.user_says(fake_discord.ann, fake_discord.general, "still there?")
    fake_discord.fail_next("GET", EDIT, 0)
    assert (await general.fetch_message(question)).content == "still there?"
    fake_discord.fail_next("GET", EDIT, 0, 0)
    with pytest.raises(aiohttp.ClientOSError):
        await general.fetch_message(question)
    assert [f[2] for f in fake_discord.faults] == [0, 0, 0, 0]


async def test_fail_for_fails_every_request_for_a_while(fake_discord: FakeDiscord, client: Client) -> None:
    general = channel(client, fake_discord.general)
    fake_discord.fail_for("POST", SEND, 503, 0.5)
    for _ in range(3):
        with pytest.raises(discord.DiscordServerError):
            await general.send("down")
    await asyncio.sleep(0.6)
    await general.send("up")
    assert fake_discord.faults == [("POST", SEND, 503)] * 3
    assert [m["content"] for m in fake_discord.bot_messages(fake_discord.general)] == ["up"]


# ---- replies to deleted messages -------------------------------------------------------------


async def test_reply_to_a_deleted_message(fake_discord: FakeDiscord, client: Client) -> None:
    general = channel(client, fake_discord.general)
    question_id = await fake_discord.user_says(fake_discord.ann, fake_discord.general, "question")
    question = await general.fetch_message(question_id)
    await fake_discord.user_deletes(question_id)

    with pytest.raises(discord.NotFound) as missing:
        await general.fetch_message(question_id)
    assert missing.value.code == 10008

    with pytest.raises(discord.HTTPException) as refused:
        await general.send("answer", reference=question)  # fail_if_not_exists defaults to True
    assert refused.value.status == 400 and refused.value.code == 50035
    assert "message_reference" in refused.value.text

    answer = await general.send("answer", reference=question.to_reference(fail_if_not_exists=False))
    stored = fake_discord.messages[answer.id]
    assert answer.reference is None and "message_reference" not in stored and stored["type"] == 0
    assert fake_discord.replies_to(question_id) == []

    live_id = await fake_discord.user_says(fake_discord.ann, fake_discord.general, "another")
    reply = await general.send("yes", reference=(await general.fetch_message(live_id)).to_reference(
        fail_if_not_exists=False))
    assert reply.reference is not None and reply.reference.message_id == live_id


# ---- channel history -----------------------------------------------------------------------


async def test_history_pages_like_discord(fake_discord: FakeDiscord, client: Client) -> None:
    d = fake_discord
    general = channel(client, d.general)
    first = await d.user_says(d.ann, d.general, "before the outage")
    ids = [await d.user_says(d.bob if i % 2 else d.ann, d.general, f"missed {i}") for i in range(130)]
    await d.user_deletes(ids[7])
    await d.user_says(d.ann, d.random, "elsewhere")
    expected = [i for i in ids if i != ids[7]]

    after = [m async for m in general.history(after=discord.Object(first), oldest_first=True, limit=None)]
    assert [m.id for m in after] == expected  # two pages, oldest first, no deleted message
    assert after[0].content == "missed 0" and after[-1].content == "missed 129"

    newest = [m async for m in general.history(limit=5)]
    assert [m.id for m in newest] == expected[::-1][:5]
    older = [m async for m in general.history(before=discord.Object(ids[10]), limit=3)]
    assert [m.id for m in older] == [ids[9], ids[8], ids[6]]
    around = [m.id async for m in general.history(around=discord.Object(ids[50]), limit=5)]
    assert sorted(around) == ids[48:53]
    everything = [m async for m in general.history(limit=None, oldest_first=True)]
    assert [m.id for m in everything] == [first, *expected]
    assert d.rate_limited == []


# ---- gateway: RESUME, new sessions, the bot being down -----------------------------------------


async def test_events_sent_while_disconnected_are_replayed_on_resume(fake_discord: FakeDiscord,
                                                                     client: Client) -> None:
    d = fake_discord
    live = await d.user_says(d.ann, d.general, "live")
    await wait_for(lambda: "live" in client.contents())
    await d.close_gateway(4000)
    assert not d.connected
    missed = [await d.user_says(d.ann, d.general, f"while down {i}") for i in range(3)]
    await d.user_edits(missed[0], "while down 0 (edited)")
    await asyncio.wait_for(d.resumed.wait(), 10)
    await wait_for(lambda: len(client.received) == 4)
    assert [m.id for m in client.received] == [live, *missed]
    assert d.connected and d.identifies == 1 and d.resumes == 1
    await wait_for(lambda: client.resumes == 1)
    # The MESSAGE_UPDATE was replayed too. discord.py runs on_message as a task, so after a
    # burst of replayed events the handler may already see the edited content.
    cached = discord.utils.get(client.cached_messages, id=missed[0])
    assert cached is not None and cached.content == "while down 0 (edited)"
    await d.user_says(d.ann, d.general, "after")
    await wait_for(lambda: "after" in client.contents())


async def test_a_lost_session_means_identify_and_no_replay(fake_discord: FakeDiscord, client: Client) -> None:
    d = fake_discord
    d.identified.clear()
    await d.close_gateway(4000, resumable=False)
    missed = await d.user_says(d.ann, d.general, "lost")
    await asyncio.wait_for(d.identified.wait(), 10)
    assert d.identifies == 2 and d.resumes == 0  # RESUME got INVALID_SESSION, then IDENTIFY
    await d.user_says(d.ann, d.general, "new session")
    await wait_for(lambda: "new session" in client.contents())
    assert "lost" not in client.contents()
    backfill = [m.id async for m in channel(client, d.general).history(limit=10)]
    assert missed in backfill  # what a new session misses is in the channel's history


async def test_messages_while_no_bot_is_connected_exist_but_are_not_replayed_to_a_new_session(
    fake_discord: FakeDiscord,
) -> None:
    d = fake_discord
    assert not d.connected
    offline = await d.user_says(d.ann, d.dm, "are you there?")  # nobody connected: no error
    assert d.messages[offline]["content"] == "are you there?"
    point_discord_at(d.api_base, d.gateway_url)
    for round_ in range(2):  # the same bot, started twice (a restarted process)
        client = Client()
        task = asyncio.create_task(client.start("fake-token"))
        await asyncio.wait_for(client.wait_until_ready(), 20)
        assert {g.id for g in client.guilds} == {GUILD_ID, GUILD2_ID}
        await d.user_says(d.ann, d.dm, f"hello {round_}")
        await wait_for(lambda: f"hello {round_}" in client.contents())
        assert client.contents() == [f"hello {round_}"]
        await client.close()
        await asyncio.gather(task, return_exceptions=True)
        await wait_for(lambda: not d.connected)
    assert d.identifies == 2


# ---- the second server and webhooks --------------------------------------------------------


async def test_second_server_is_owned_by_stranger(fake_discord: FakeDiscord, client: Client) -> None:
    d = fake_discord

    @client.tree.command(name="perms")
    async def perms(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            f"{interaction.guild_id} {interaction.permissions.administrator}", ephemeral=True
        )

    await client.tree.sync()
    other = client.get_guild(GUILD2_ID)
    assert other is not None and other.owner_id == d.stranger.id
    assert [c.id for c in other.text_channels] == [d.other_general]
    assert [c.id for c in client.get_guild(GUILD_ID).text_channels] == [d.general, d.random]

    answers = {}
    for user, channel_id in ((d.stranger, d.other_general), (d.owner, d.other_general), (d.owner, d.general),
                             (d.stranger, d.general)):
        interaction = await d.slash(user, channel_id, "perms")
        answers[(user.name, channel_id)] = (await wait_for(lambda: d.original(interaction)))["content"]
    assert answers == {
        ("Stranger", d.other_general): f"{GUILD2_ID} True",
        ("Owner", d.other_general): f"{GUILD2_ID} False",
        ("Owner", d.general): f"{GUILD_ID} True",
        ("Stranger", d.general): f"{GUILD_ID} False",
    }
    await d.user_says(d.stranger, d.other_general, "hi from the other server")
    message = await wait_for(lambda: [m for m in client.received if m.content == "hi from the other server"])
    assert message[0].guild.id == GUILD2_ID and message[0].author.id == d.stranger.id


async def test_webhook_messages_look_like_discord_s(fake_discord: FakeDiscord, client: Client) -> None:
    d = fake_discord
    await d.webhook_says(d.general, "GitHub", "a new commit")
    await d.user_says(d.bob, d.general, "relayed", webhook_id=555)
    messages = await wait_for(lambda: client.received if len(client.received) == 2 else None)
    hook, relayed = messages
    assert hook.webhook_id is not None and hook.author.bot and hook.author.discriminator == "0000"
    assert hook.author.name == "GitHub" and hook.author.id == hook.webhook_id
    assert relayed.webhook_id == 555 and relayed.author.name == "Bob" and relayed.author.bot
    assert isinstance(relayed.author, discord.User)  # not a guild member


async def test_channel_webhooks_are_created_executed_edited_and_refused_like_discord_s(
        fake_discord: FakeDiscord, client: Client) -> None:
    d = fake_discord
    general = channel(client, d.general)
    hook = await general.create_webhook(name="Captain Vex", avatar=PNG_1PX)
    assert d.webhook_avatars[hook.id] == PNG_1PX and hook.token
    assert [w.id for w in await general.webhooks()] == [hook.id]
    sent = await hook.send("Ahoy.", username="Captain Vex", wait=True)
    assert sent.webhook_id == hook.id and sent.author.name == "Captain Vex" and sent.author.bot
    received = await wait_for(lambda: [m for m in client.received if m.id == sent.id])
    assert received[0].webhook_id == hook.id and received[0].application_id == BOT_ID
    await hook.edit_message(sent.id, content="Ahoy, crew.")
    assert d.messages[sent.id]["content"] == "Ahoy, crew." and d.history[sent.id] == ["Ahoy.", "Ahoy, crew."]
    await hook.delete_message(sent.id)
    assert sent.id in d.deleted
    d.fail_next("POST", "/webhooks/{id}/{token}", 503)  # discord.py's webhook adapter retries 5xx itself
    again = await hook.send("again", wait=True)
    assert d.faults == [("POST", "/webhooks/{id}/{id}", 503)] and d.messages[again.id]["content"] == "again"
    d.remove_webhook(hook.id)
    with pytest.raises(discord.NotFound) as gone:
        await hook.send("gone", wait=True)
    assert gone.value.code == 10015
    for i in range(15):
        await general.create_webhook(name=f"hook {i}")
    with pytest.raises(discord.HTTPException) as full:
        await general.create_webhook(name="one too many")
    assert full.value.code == 30007
    d.take_manage_webhooks()
    with pytest.raises(discord.Forbidden) as refused:
        await channel(client, d.random).create_webhook(name="Marlowe")
    assert refused.value.code == 50013


# ---- the real bot process ------------------------------------------------------------------


def answered_after(d: FakeDiscord, channel_id: int, message_id: int) -> list[dict]:
    """The bot's messages in the channel after `message_id` (a reply or a plain message)."""
    return [m for m in d.bot_messages(channel_id) if int(m["id"]) > message_id]


@pytest.mark.llama
async def test_real_bot_process_answers_and_comes_back_after_sigkill(
    fake_discord: FakeDiscord, database_url: str, gguf_path: Path, tmp_path: Path
) -> None:
    d = fake_discord
    bot = BotProcess(bot_env(d, database_url, gguf_path, MAX_NEW_TOKENS="8"), tmp_path, tmp_path / "bot.log")
    try:
        await bot.start_and_wait(d, timeout=180)
        question = await d.user_says(d.ann, d.dm, "Hello! What is your name?")
        answers = await wait_for(lambda: answered_after(d, d.dm, question), timeout=120)
        assert answers[0]["author"]["id"] == str(BOT_ID) and answers[0]["content"].strip()

        bot.kill()
        assert await bot.wait(10) == -9
        await wait_for(lambda: not d.connected, timeout=10)
        await bot.start_and_wait(d, timeout=180)
        assert d.identifies == 2 and bot.starts == 2
        again = await d.user_says(d.ann, d.dm, "Are you back?")
        await wait_for(lambda: answered_after(d, d.dm, again), timeout=120)
    except BaseException:
        print(bot.log_tail(80))
        raise
    finally:
        await bot.stop()
