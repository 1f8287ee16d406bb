"""Reading the bot's store from an end-to-end test without racing the bot's bookkeeping.

The bot stores a message or a reply's final state, makes Discord show it, and only then
marks the reply delivered; a test that reads the store the moment Discord shows something
can land in between. These helpers poll until the store has caught up (or fail, saying
what they saw)."""

from __future__ import annotations

import asyncio

from bot.core.conversation import Message, StoredReply
from tests.e2e.conftest import Harness


async def stored(h: Harness, channel_id: int, count: int) -> list[Message]:
    """The stored history of a channel, once it has `count` messages."""
    for _ in range(200):
        history = await h.store.recent_messages(f"discord:{channel_id}", 100)
        if len(history) >= count:
            return history
        await asyncio.sleep(0.05)
    raise AssertionError(f"history has {len(history)} messages, expected {count}")


async def stored_containing(h: Harness, channel_id: int, text: str) -> list[Message]:
    """The stored history of a channel, once a message in it contains `text` (a command's
    answer is stored right after Discord took it: a test sees it a moment before)."""
    for _ in range(200):
        history = await h.store.recent_messages(f"discord:{channel_id}", 100)
        if any(text in m.content for m in history):
            return history
        await asyncio.sleep(0.05)
    raise AssertionError(f"no stored message contains {text!r}: {[m.content for m in history]}")


async def stored_reply(h: Harness, channel_id: int) -> StoredReply:
    """The channel's latest stored reply, as it is now."""
    reply = await h.store.latest_reply(f"discord:{channel_id}")
    assert reply is not None
    return reply


async def delivered_reply(h: Harness, channel_id: int, tries: int = 600) -> StoredReply:
    """The latest stored reply once it is final and marked delivered: Discord can show the
    final reply a moment before the store says so."""
    for _ in range(tries):
        reply = await stored_reply(h, channel_id)
        if reply.status != "streaming" and not reply.undelivered:
            return reply
        await asyncio.sleep(0.05)
    raise AssertionError(f"reply not delivered: {reply}")
