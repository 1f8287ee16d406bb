"""What "nothing is lost" means, checked against the database file and the fake Discord:
every question is stored and followed by a reply; every reply is in a final state, shown in
Discord as such (no live Stop button) and stored with the ids of all its parts; every
message of the bot that Discord shows belongs to a stored reply."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from sqlalchemy import select

from bot.core.conversation import FINAL_STATES
from bot.storage.store import ConversationRow, MessageRow, Store
from tests.e2e.fake_discord import FakeDiscord


@dataclass(frozen=True)
class Row:
    platform_id: str | None
    is_bot: bool
    content: str
    status: str | None
    reply_to: str | None
    part_ids: tuple[str, ...]
    undelivered: bool
    deleted: bool


async def rows(store: Store, channel_id: int) -> list[Row]:
    """Every stored row of a channel's conversation, in order (read from the database)."""
    async with store._sessions() as session:
        found = (await session.scalars(
            select(MessageRow).join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
            .where(ConversationRow.key == f"discord:{channel_id}").order_by(MessageRow.id)
        )).all()
    return [Row(r.platform_id, r.is_bot, r.content, r.reply_status, r.reply_to, tuple(json.loads(r.part_ids or "[]")),
                r.undelivered, r.deleted_at is not None) for r in found]


def live_stop_buttons(d: FakeDiscord, channel_id: int) -> list[int]:
    return [int(m["id"]) for m in d.bot_messages(channel_id)
            if any(c.get("custom_id", "").startswith("hermes:stop:")
                   for row in m.get("components", []) for c in row.get("components", []))]


def problems(d: FakeDiscord, channel_rows: dict[int, list[Row]], questions: dict[int, list[int]]) -> list[str]:
    found: list[str] = []
    for channel_id, asked in questions.items():
        stored = channel_rows[channel_id]
        stored_ids = {r.platform_id for r in stored}
        replies = [r for r in stored if r.status is not None]
        for question in asked:
            if str(question) not in stored_ids:
                found.append(f"question {question} in {channel_id} is not stored")
            if not any(r.reply_to and int(r.reply_to) >= question for r in replies):
                found.append(f"question {question} in {channel_id} has no reply")
        for reply in replies:
            if reply.status not in FINAL_STATES:
                found.append(f"a reply in {channel_id} is still {reply.status}")
            if reply.undelivered:
                found.append(f"a reply in {channel_id} is not delivered: {reply.content[:40]!r}")
        parts = {int(p) for r in replies for p in r.part_ids}
        for message in d.bot_messages(channel_id):
            if int(message["id"]) not in parts:
                found.append(f"Discord shows {message['content'][:40]!r} in {channel_id}, which history lacks")
        if stops := live_stop_buttons(d, channel_id):
            found.append(f"live Stop buttons in {channel_id}: {stops}")
    return found


async def assert_nothing_lost(d: FakeDiscord, store: Store, questions: dict[int, list[int]],
                              timeout: float = 30.0) -> dict[int, list[Row]]:
    """Wait until nothing is lost (or fail with what is); the rows of each channel."""
    deadline = time.monotonic() + timeout
    while True:
        channel_rows = {channel_id: await rows(store, channel_id) for channel_id in questions}
        found = problems(d, channel_rows, questions)
        if not found:
            return channel_rows
        if time.monotonic() > deadline:
            raise AssertionError("lost or unfinished:\n" + "\n".join(found))
        await asyncio.sleep(0.1)
