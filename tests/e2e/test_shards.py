"""Sharding (SHARD_COUNT, SHARD_IDS): two bot instances, each running one of two shards,
over one shared database (an SQLite file, or PostgreSQL), the real discord.py and the fake
Discord's sharded gateway. Every question is answered exactly once, by the instance whose
shard Discord sends it to: live, after a shard's connection drops, and by the recovery after
both instances restart.

GUILD_ID and GUILD2_ID are both on shard 1 of 2 (their ids differ below bit 22); the tests
add GUILD3_ID, on shard 0, where DMs belong too."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from discord.ext import commands

from bot.storage import migrate
from bot.edge.bot import ShardedHermesBot
from bot.edge.reply_stream import INTERRUPTED_NOTICE
from bot.core.settings import SettingsError, load_settings
from bot.edge.sharding import Shards, shard_of
from bot.storage.store import Store
from tests.e2e.conftest import Harness, StartBot
from tests.e2e.fake_discord import GUILD2_ID, GUILD3_ID, GUILD_ID, FakeDiscord, wait_for
from tests.e2e.nothing_lost import assert_nothing_lost
from tests.e2e.scripted_engine import ScriptedEngine

pytest_plugins = ["tests.pg"]

QUIET = 1.5  # seconds given to a second (wrong) answer that must not come
SHARD0 = "answered by shard 0"
SHARD1 = "answered by shard 1"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database both instances share: one SQLite file, or one PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def migrated(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared database exists before the instances start (two processes starting on a
    fresh database would both migrate it at once). Both instances live in this one process,
    where Alembic (module-level state) cannot run twice at once: their start-up checks of
    the schema take turns."""
    store = await Store.open(database_url)
    await store.close()
    lock = threading.Lock()
    upgrade = migrate.upgrade

    def one_at_a_time(*args: Any, **kwargs: Any) -> None:
        with lock:
            upgrade(*args, **kwargs)

    monkeypatch.setattr(migrate, "upgrade", one_at_a_time)


def add_third_guild(d: FakeDiscord) -> int:
    """GUILD3_ID (shard 0 of 2) with a text channel, before any instance connects; the channel."""
    assert d.add_guild("Third Guild") == GUILD3_ID
    return d.add_text_channel("general", GUILD3_ID)


async def start_both(start_bot: StartBot, shard0_replies: int = 0, shard1_replies: int = 0) -> tuple[Harness, Harness]:
    """Both instances, started together as two processes would be, their engines' replies
    queued before they connect (the recovery may answer at once): SHARD0 or SHARD1, saying
    which instance answered."""
    engines = [ScriptedEngine(n_ctx=2048), ScriptedEngine(n_ctx=2048)]
    engines[0].say(*[SHARD0] * shard0_replies)
    engines[1].say(*[SHARD1] * shard1_replies)
    shard0, shard1 = await asyncio.gather(*(start_bot(engine, SHARD_COUNT="2", SHARD_IDS=str(shard))
                                            for shard, engine in enumerate(engines)))
    for h in (shard0, shard1):
        # The start-up recovery has read the database: a question sent now is answered live
        # only. (Sent while it reads, one could be queued twice in its lane, sharded or not:
        # the recovery would find it stored, not yet answered, while its live answer begins.)
        await wait_for(lambda h=h: recovered(h))
    return shard0, shard1


def recovered(h: Harness) -> bool:
    chat = h.bot.get_cog("Chat")
    startup = getattr(getattr(chat, "recovery", None), "_startup", None)
    return startup is not None and startup.done()


def answers(d: FakeDiscord, questions: dict[int, int]) -> dict[int, list[str]]:
    """Each question's replies in Discord, by channel."""
    return {channel: [m["content"] for m in d.replies_to(q)] for channel, q in questions.items()}


async def all_answered(d: FakeDiscord, questions: dict[int, int]) -> None:
    for question in questions.values():
        await wait_for(lambda q=question: d.replies_to(q), timeout=30)
    await asyncio.sleep(QUIET)


def test_the_servers_fall_on_different_shards() -> None:
    assert [shard_of(g, 2) for g in (GUILD_ID, GUILD2_ID, GUILD3_ID, None)] == [1, 1, 0, 0]
    shard1 = Shards(2, frozenset({1}))
    assert shard1.owns(GUILD_ID) and not shard1.owns(GUILD3_ID) and not shard1.owns(None)


def test_shard_settings() -> None:
    def shards(**env: str) -> Shards | None:
        return Shards.of(load_settings(env, dotenv_path=None))

    assert shards() is None and shards(SHARD_COUNT="2") is None, "not sharded, or every shard: no split"
    assert shards(SHARD_COUNT="2", SHARD_IDS="0, 1") is None
    assert shards(SHARD_COUNT="3", SHARD_IDS="2,0") == Shards(3, frozenset({0, 2}))
    for env, error in (({"SHARD_IDS": "1"}, "SHARD_IDS needs SHARD_COUNT"),
                       ({"SHARD_COUNT": "2", "SHARD_IDS": "2"}, "SHARD_IDS=2: expected ids below SHARD_COUNT=2"),
                       ({"SHARD_COUNT": "2", "SHARD_IDS": "one"}, "'one' is not a shard id"),
                       ({"SHARD_COUNT": "0"}, "SHARD_COUNT=0: expected an integer >= 1")):
        with pytest.raises(SettingsError, match=re.escape(error)):
            load_settings(env, dotenv_path=None)


async def test_each_server_and_dm_is_answered_once_by_its_shards_instance(
        fake_discord: FakeDiscord, start_bot: StartBot, migrated: None) -> None:
    d = fake_discord
    third = add_third_guild(d)
    h0, h1 = await start_both(start_bot, 3, 2)
    for h, shard in ((h0, 0), (h1, 1)):
        assert isinstance(h.bot, ShardedHermesBot) and isinstance(h.bot, commands.AutoShardedBot)
        assert h.bot.shard_count == 2 and h.bot.shard_ids == [shard]
    assert sorted(d.shard_identifies) == [(0, 2), (1, 2)]
    assert not [r for r in d.requests if r[1].endswith("/gateway/bot")], "the shard count is given, not asked"
    assert {g.id for g in h0.bot.guilds} == {GUILD3_ID}, "a shard's READY lists only its servers"
    assert {g.id for g in h1.bot.guilds} == {GUILD_ID, GUILD2_ID}
    assert d.connected and d.shard_connected(0) and d.shard_connected(1)

    questions = {
        d.general: await d.user_says(d.ann, d.general, "in the first server", mention_bot=True),
        d.other_general: await d.user_says(d.ann, d.other_general, "in the second server", mention_bot=True),
        third: await d.user_says(d.ann, third, "in the third server", mention_bot=True),
        d.dm: await d.user_says(d.ann, d.dm, "in a DM"),
    }
    await all_answered(d, questions)
    assert answers(d, questions) == {d.general: [SHARD1], d.other_general: [SHARD1], third: [SHARD0],
                                     d.dm: [SHARD0]}
    assert len(h0.engine.prompts) == 2 and len(h1.engine.prompts) == 2
    await assert_nothing_lost(d, h0.store, {c: [q] for c, q in questions.items()})

    # A slash command in the third server reaches shard 0's instance only (a second answer
    # to the interaction would be refused with 40060 and logged as a failed command).
    enabled = await d.slash(d.owner, third, "channel", sub="enable")
    await wait_for(lambda: enabled.response_type == 4)
    assert (await h1.store.state(f"discord:{third}")).enabled, "in the database both instances share"
    said = await d.user_says(d.bob, third, "no mention needed now")
    await all_answered(d, {third: said})
    assert answers(d, {third: said}) == {third: [SHARD0]}
    assert len(h1.engine.prompts) == 2


async def test_a_shard_resumes_on_its_own(fake_discord: FakeDiscord, start_bot: StartBot, migrated: None) -> None:
    d = fake_discord
    third = add_third_guild(d)
    h0, h1 = await start_both(start_bot, 1, 1)
    await d.close_gateway(4000, shard=1)
    meanwhile = await d.user_says(d.ann, d.general, "while shard 1 is away", mention_bot=True)
    live = await d.user_says(d.ann, third, "shard 0 is still here", mention_bot=True)
    await wait_for(lambda: d.replies_to(live))
    await asyncio.wait_for(d.resumed.wait(), 20)
    await all_answered(d, {d.general: meanwhile})
    assert answers(d, {d.general: meanwhile, third: live}) == {d.general: [SHARD1], third: [SHARD0]}
    assert d.identifies == 2 and d.resumes == 1, "shard 1 resumed its session; shard 0 kept its own"


async def test_after_both_restart_a_question_sent_meanwhile_is_answered_once(
        fake_discord: FakeDiscord, start_bot: StartBot, migrated: None) -> None:
    d = fake_discord
    third = add_third_guild(d)
    h0, h1 = await start_both(start_bot, 2, 1)
    for user, channel in ((d.mod, d.general), (d.owner, third)):
        enabled = await d.slash(user, channel, "channel", sub="enable")
        await wait_for(lambda i=enabled: i.response_type == 4)
    before = {d.general: await d.user_says(d.ann, d.general, "hello first server"),
              third: await d.user_says(d.ann, third, "hello third server"),
              d.dm: await d.user_says(d.ann, d.dm, "hello in a DM")}
    await all_answered(d, before)
    await assert_nothing_lost(d, h0.store, {c: [q] for c, q in before.items()})
    await h0.bot.close()
    await h1.bot.close()

    missed = {d.general: await d.user_says(d.bob, d.general, "said while you were both away"),
              third: await d.user_says(d.bob, third, "said in the third server meanwhile"),
              d.dm: await d.user_says(d.ann, d.dm, "a DM meanwhile")}
    h0, h1 = await start_both(start_bot, 2, 1)
    await all_answered(d, missed)
    assert answers(d, missed) == {d.general: [SHARD1], third: [SHARD0], d.dm: [SHARD0]}
    assert len(h0.engine.prompts) == 2 and len(h1.engine.prompts) == 1
    assert "said while you were both away" in h1.engine.prompts[0]
    await assert_nothing_lost(d, h1.store, {c: [before[c], missed[c]] for c in missed})

    await h0.bot.close()
    await h1.bot.close()
    h0, h1 = await start_both(start_bot)
    await asyncio.sleep(2)
    assert h0.engine.prompts == [] and h1.engine.prompts == [], "answered once, not again at the next start"


async def test_an_instance_starting_leaves_the_other_instances_reply_streaming(
        fake_discord: FakeDiscord, start_bot: StartBot, migrated: None) -> None:
    """At start an instance marks `interrupted` the replies its last run left streaming: only
    its own shards' ones, never a reply the other instance is writing right now."""
    d = fake_discord
    add_third_guild(d)
    h0, h1 = await start_both(start_bot)
    story = " ".join(f"Word{i}." for i in range(60))
    h1.engine.delay = 0.05
    h1.engine.say(story)
    question = await d.user_says(d.ann, d.general, "a long story please", mention_bot=True)
    reply = (await wait_for(lambda: d.replies_to(question)))[0]
    await h0.bot.close()
    await start_bot(ScriptedEngine(n_ctx=2048), SHARD_COUNT="2", SHARD_IDS="0")
    await wait_for(lambda: d.messages[int(reply["id"])]["content"] == story, timeout=30)
    stored = await assert_nothing_lost(d, h1.store, {d.general: [question]})
    assert [(r.status, r.content) for r in stored[d.general] if r.is_bot] == [("done", story)]
    assert not any(INTERRUPTED_NOTICE in text for text in d.history[int(reply["id"])])
