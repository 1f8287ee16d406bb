"""The real bot process (`python -m bot`, the real small GGUF, SQLite) stopped the way
deployments stop it: SIGTERM mid-reply (systemctl stop, docker stop) and SIGKILL (a crash,
the OOM killer) followed by a start. Nothing may be lost, no Stop button may stay live,
and the next message is answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.storage.store import Store
from tests.e2e.bot_process import BotProcess, bot_env
from tests.e2e.fake_discord import FakeDiscord, wait_for
from tests.e2e.nothing_lost import assert_nothing_lost, live_stop_buttons, rows

pytestmark = pytest.mark.llama
# Long enough that the reply is still being written well after it spills into a second
# Discord message (700 tokens ended within a poll of that on a fast host: CI, 2026-12-07).
LONG = {"MAX_NEW_TOKENS": "1400", "N_CTX": "4096", "TEMPERATURE": "0", "REPEAT_PENALTY": "1.0"}
ASK = "Write a very long story about a lighthouse keeper, in many paragraphs."


async def wait_for_reply(store: Store, channel_id: int, question: int, done: Callable[[Any], bool]) -> Any:
    """The stored reply to `question` once `done(reply)` holds (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        found = [r for r in await rows(store, channel_id) if r.reply_to == str(question) and done(r)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"the reply to {question} never reached the expected state"
        await asyncio.sleep(0.2)


def components(d: FakeDiscord, message_id: int) -> list[str]:
    return [c["label"] for row in d.messages[message_id]["components"] for c in row["components"]]


async def test_sigterm_with_eight_replies_in_flight(
    fake_discord: FakeDiscord, database_url: str, gguf_path: Path, tmp_path: Path
) -> None:
    d = fake_discord
    channels = [d.add_text_channel(f"room-{i}") for i in range(7)] + [d.dm]
    bot = BotProcess(bot_env(d, database_url, gguf_path, **LONG), tmp_path, tmp_path / "bot.log")
    try:
        await bot.start_and_wait(d, timeout=180)
        questions = {c: await d.user_says(d.ann, c, ASK, mention_bot=c != d.dm) for c in channels}
        # Every reply is under way: two generate (two slots), six wait in the queue.
        await wait_for(lambda: all(live_stop_buttons(d, c) for c in channels), timeout=300)
        assert any(not m["content"].startswith("*(queued") for c in channels for m in d.bot_messages(c))
        started = time.monotonic()
        bot.terminate()
        code = await bot.wait(40)
        took = time.monotonic() - started
    except BaseException:
        print(bot.log_tail(80))
        raise
    finally:
        await bot.stop()
    print(f"SIGTERM with {len(channels)} replies in flight: exit {code} after {took:.2f} s")
    assert code == 0, bot.log_tail(40)
    assert took < 15
    store = await Store.open(database_url, migrate=False)
    try:
        stored = await assert_nothing_lost(d, store, {c: [q] for c, q in questions.items()}, timeout=0)
    finally:
        await store.close()
    statuses = [r.status for c in channels for r in stored[c] if r.is_bot]
    assert len(statuses) == 8 and "interrupted" in statuses, statuses
    for channel in channels:
        reply = stored[channel][-1]
        shown = d.messages[int(reply.part_ids[0])]
        assert components(d, int(reply.part_ids[0])) == ["Regenerate", "Continue"]
        if reply.status == "interrupted":
            assert "interrupted" in shown["content"] and "interrupted" not in reply.content


async def test_kill_9_mid_reply_then_start_again(
    fake_discord: FakeDiscord, database_url: str, gguf_path: Path, tmp_path: Path
) -> None:
    d = fake_discord
    bot = BotProcess(bot_env(d, database_url, gguf_path, **LONG), tmp_path, tmp_path / "bot.log")
    try:
        await bot.start_and_wait(d, timeout=180)
        question = await d.user_says(d.ann, d.dm, ASK)
        reply_id = int((await wait_for(lambda: d.replies_to(question), timeout=60))[0]["id"])
        # Killed once the reply runs over two Discord messages (recovery must mend both).
        await wait_for(lambda: len(d.bot_messages(d.dm)) >= 2, timeout=300)  # slow on a loaded machine
        shown_at_kill = d.messages[reply_id]["content"]
        bot.kill()
        parts = sorted(int(m["id"]) for m in d.bot_messages(d.dm) if int(m["id"]) >= reply_id)
        assert await bot.wait(10) == -9
        killed = time.monotonic()
        assert components(d, reply_id) == ["Stop", "Regenerate"], "the crash left a live Stop button"
        missed = await d.user_says(d.ann, d.dm, "Are you still there?")

        await bot.start_and_wait(d, timeout=180)
        # The cut reply: final in Discord (Stop gone, Regenerate live, marked interrupted).
        await wait_for(lambda: components(d, reply_id) == ["Regenerate", "Continue"], timeout=60)
        store = await Store.open(database_url, migrate=False)
        try:
            cut = await wait_for_reply(store, d.dm, question, lambda r: not r.undelivered)
        finally:
            await store.close()
        # Every part Discord took before the kill is the reply's (none orphaned, none doubled),
        # even one whose id the kill kept from the store; the notice closes the last part.
        assert parts == [int(p) for p in cut.part_ids][:len(parts)], (parts, cut.part_ids)
        assert "interrupted" in d.messages[int(cut.part_ids[-1])]["content"]
        assert "interrupted" not in d.messages[reply_id]["content"], "the notice closes the last part"
        # The message sent while the bot was down is back-filled and answered, once.
        answer = (await wait_for(lambda: d.replies_to(missed), timeout=120))[0]
        first_answer = time.monotonic() - killed
        await wait_for(lambda: components(d, int(answer["id"])) == ["Regenerate", "Continue"], timeout=120)
        print(f"kill -9 → first answer after the restart: {first_answer:.2f} s")

        store = await Store.open(database_url, migrate=False)
        try:
            stored = await assert_nothing_lost(d, store, {d.dm: [question, missed]}, timeout=30)
            cut = next(r for r in stored[d.dm] if r.reply_to == str(question))
            assert cut.status == "interrupted"
            assert cut.content and shown_at_kill.startswith(cut.content[:100]), "the partial text is in history"
            # Regenerate works on the interrupted reply, after the restart.
            click = await d.click(d.ann, reply_id, f"hermes:regen:{d.ann.id}")
            await wait_for(lambda: click.response_type == 6, timeout=10)
            deadline = time.monotonic() + 120
            while not any(r.reply_to == str(question) and r.status == "done" and not r.undelivered
                          for r in await rows(store, d.dm)):
                assert time.monotonic() < deadline, "Regenerate did not finish"
                await asyncio.sleep(0.2)
            # Stop gone, Regenerate live; the interrupted text is kept as the first alternative.
            assert components(d, reply_id) == ["◀", "2/2", "▶", "Regenerate", "Continue"]
            assert "interrupted" not in d.messages[reply_id]["content"]
            await assert_nothing_lost(d, store, {d.dm: [question, missed]}, timeout=30)
        finally:
            await store.close()
    except BaseException:
        print(bot.log_tail(80))
        raise
    finally:
        await bot.stop()
