"""Nothing is lost when PostgreSQL restarts or goes away: the bot on a real PostgreSQL 15
server, through real discord.py against the stand-in, while the server is restarted
(`pg_ctl restart -m fast`) under a streaming reply, stopped for 20 s, and stopped for longer
than the bot's retries. Every question and reply is stored exactly once, every question is
answered, and the bot answers normally afterwards.

These tests restart the server, so they have a cluster of their own (not the session's).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import FakeDiscord, wait_for
from tests.e2e.nothing_lost import assert_nothing_lost, rows
from tests.pg import PostgresCluster, start_cluster


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PostgresCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture
def database_url(own_cluster: PostgresCluster) -> str:  # overrides the SQLite one of tests/conftest.py
    if not _running(own_cluster):  # a test that failed midway left it stopped
        own_cluster.start()
    return own_cluster.url(own_cluster.create_database())


def _running(cluster: PostgresCluster) -> bool:
    try:
        cluster.psql("SELECT 1")
        return True
    except RuntimeError:
        return False


async def _in_thread(call, *args) -> None:  # type: ignore[no-untyped-def]
    await asyncio.to_thread(call, *args)


async def _answered(d: FakeDiscord, question: int, expected: str, asked_at: float, timeout: float) -> float:
    """Seconds from the question to its whole reply in Discord."""
    def whole() -> bool:
        return any(m["content"].strip() == expected for m in d.replies_to(question))

    await wait_for(whole, timeout=timeout)
    return time.monotonic() - asked_at


async def _check_exactly_once(h, questions: dict[int, list[int]], answers: dict[int, str]) -> None:  # type: ignore[no-untyped-def]
    channel_rows = await assert_nothing_lost(h.discord, h.store, questions, timeout=30)
    for channel_id, stored in channel_rows.items():
        ids = Counter(r.platform_id for r in stored if not r.is_bot)
        assert all(count == 1 for count in ids.values()), f"a message stored twice: {ids}"
        replies = Counter(r.reply_to for r in stored if r.is_bot)
        for question in questions[channel_id]:
            assert ids[str(question)] == 1, f"question {question} is not stored once"
            assert replies[str(question)] == 1, f"question {question} has {replies[str(question)]} replies"
        for row in stored:
            if row.is_bot:
                assert row.status == "done" and row.content == answers[int(row.reply_to)], row


async def test_a_restart_while_a_reply_streams_and_a_question_arrives(
    start_bot: StartBot, own_cluster: PostgresCluster
) -> None:
    h = await start_bot(DATABASE_RETRY_SECONDS="60")
    d = h.discord
    long_reply = " ".join(f"word{i}" for i in range(60))  # 60 pieces × 0.05 s: streams for 3 s
    h.engine.delay = 0.05
    h.engine.say(long_reply, "the second answer", "after the restart")
    first_at = time.monotonic()
    first = await d.user_says(d.ann, d.general, "tell me a long story", mention_bot=True)
    await wait_for(lambda: d.replies_to(first))  # streaming now
    restart = asyncio.create_task(_in_thread(own_cluster.restart, "fast"))
    await asyncio.sleep(0.3)  # the server is going down: the second person asks meanwhile
    second_at = time.monotonic()
    second = await d.user_says(d.bob, d.general, "and a question from me", mention_bot=True)
    await restart
    delays = [await _answered(d, first, long_reply, first_at, 90),
              await _answered(d, second, "the second answer", second_at, 90)]
    third_at = time.monotonic()
    third = await d.user_says(d.ann, d.general, "still there?", mention_bot=True)
    delays.append(await _answered(d, third, "after the restart", third_at, 30))
    await _check_exactly_once(h, {d.general: [first, second, third]},
                              {first: long_reply, second: "the second answer", third: "after the restart"})
    print(f"\nrestart under a reply: 3 sent, 3 stored, 3 answered; delays {', '.join(f'{s:.1f}' for s in delays)} s")


async def test_the_server_stopped_for_20_seconds(start_bot: StartBot, own_cluster: PostgresCluster) -> None:
    h = await start_bot(DATABASE_RETRY_SECONDS="60")
    d = h.discord
    h.engine.say("before", "during", "after")
    before = await d.user_says(d.ann, d.general, "hello", mention_bot=True)
    await _answered(d, before, "before", time.monotonic(), 30)
    await asyncio.to_thread(own_cluster.stop, "fast")
    asked_at = time.monotonic()
    during = await d.user_says(d.bob, d.general, "is anyone there?", mention_bot=True)
    await asyncio.sleep(20)
    assert not d.replies_to(during), "no answer while the database is away"
    await asyncio.to_thread(own_cluster.start)
    delays = [await _answered(d, during, "during", asked_at, 90)]
    after_at = time.monotonic()
    after = await d.user_says(d.ann, d.general, "good", mention_bot=True)
    delays.append(await _answered(d, after, "after", after_at, 30))
    await _check_exactly_once(h, {d.general: [before, during, after]},
                              {before: "before", during: "during", after: "after"})
    log = h.bot.responder.store.availability
    assert log.available
    print(f"\n20 s stop: 3 sent, 3 stored, 3 answered; delays {', '.join(f'{s:.1f}' for s in delays)} s")


async def test_an_outage_longer_than_the_retries_keeps_the_messages(
    start_bot: StartBot, own_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_bot(DATABASE_RETRY_SECONDS="2")
    d = h.discord
    h.engine.say("one", "two", "three")
    await asyncio.to_thread(own_cluster.stop, "fast")
    asked_at = time.monotonic()
    questions = [await d.user_says(d.ann, d.general, "first while away", mention_bot=True),
                 await d.user_says(d.bob, d.dm, "second while away"),
                 await d.user_says(d.ann, d.general, "third while away", mention_bot=True)]
    await wait_for(lambda: len(h.bot.get_cog("Chat").held) == 3, timeout=30)
    await asyncio.sleep(6)  # well past the retries
    await asyncio.to_thread(own_cluster.start)
    answers = {}
    for question in questions:
        def whole(q: int = question) -> str | None:  # not the "queued" placeholder: the words
            shown = [m["content"].strip() for m in d.replies_to(q)]
            return shown[0] if shown and shown[0] in ("one", "two", "three") else None

        answers[question] = await wait_for(whole, timeout=60)
    delay = time.monotonic() - asked_at
    assert sorted(answers.values()) == ["one", "three", "two"]
    await _check_exactly_once(h, {d.general: [questions[0], questions[2]], d.dm: [questions[1]]}, answers)
    unreachable = [r for r in caplog.records if "the database is unreachable" in r.getMessage()]
    assert len(unreachable) == 1, "said once per outage, not once per message"
    print(f"\noutage past the retries: 3 sent, 3 stored, 3 answered; longest delay {delay:.1f} s")
