"""Discord shards: which conversations a process looks after when SHARD_COUNT splits the bot.

Discord sends a server's events (messages, interactions) only to the shard
`(guild_id >> 22) % SHARD_COUNT`, and DMs only to shard 0, so the live work is split by
Discord itself. What a process does on its own initiative over the shared database (the
start-up recovery, the redelivery of replies Discord could not take) must follow the same
split, or two processes would both answer one question: each process handles only the
conversations of the shards it runs (`SHARD_IDS`). A conversation's server is
`conversations.guild_id` (NULL for DMs, which belong to shard 0, and for a conversation no
message of a person reached yet, which is then shard 0's too: any process can post through
the REST API, the split only has to be the same in every process).

The queries below read and write the store's tables through its sessions; the shard of a
row is computed in SQL, the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    case,
    cast,
    literal,
    literal_column,
    select,
    update,
)

from bot.core.conversation import STREAMING, StoredReply
from bot.core.settings import Settings
from bot.storage.store import ConversationRow, MessageRow, Store, _to_reply

KEYS_PER_QUERY = 500  # conversation keys looked up at once (bound parameters stay few)


def shard_of(guild_id: int | None, shard_count: int) -> int:
    """The shard Discord sends a server's events to; DMs (no server) go to shard 0."""
    return 0 if guild_id is None else (guild_id >> 22) % shard_count


@dataclass(frozen=True)
class Shards:
    """The shards one process runs, out of `count`."""

    count: int
    ids: frozenset[int]

    @classmethod
    def of(cls, settings: Settings) -> Shards | None:
        """This process's share; None when it runs every shard (or is not sharded): then
        it looks after every conversation, as an unsharded bot does."""
        count = settings.shard_count
        if count is None or not settings.shard_ids or settings.shard_ids >= set(range(count)):
            return None
        return cls(count, frozenset(settings.shard_ids))

    def owns(self, guild_id: int | None) -> bool:
        return shard_of(guild_id, self.count) in self.ids

    def condition(self) -> ColumnElement[bool]:
        """SQL: the conversation (a ConversationRow in the query) is on one of these shards."""
        guild = cast(ConversationRow.guild_id, BigInteger)
        shard = case(
            (ConversationRow.guild_id.is_(None), literal(0, BigInteger)),
            # PostgreSQL shifts a bigint by an integer only: 22 is written in, not bound.
            else_=guild.op(">>", return_type=BigInteger)(literal_column("22", Integer)) % self.count,
        )
        return shard.in_(sorted(self.ids))


async def owned_keys(store: Store, shards: Shards, keys: Iterable[str]) -> list[str]:
    """Those of `keys` whose conversation is on these shards, in the given order."""
    keys = list(keys)

    async def read() -> set[str]:  # run again whole while the database is away (Store._retry)
        owned: set[str] = set()
        async with store._sessions() as session:
            for start in range(0, len(keys), KEYS_PER_QUERY):
                chunk = keys[start:start + KEYS_PER_QUERY]
                owned.update(await session.scalars(
                    select(ConversationRow.key).where(ConversationRow.key.in_(chunk), shards.condition())
                ))
        return owned

    owned = await store._retry(read)
    return [key for key in keys if key in owned]


async def undelivered_replies(store: Store, shards: Shards, limit: int = 100) -> list[StoredReply]:
    """`Store.undelivered_replies`, of these shards' conversations only (so that another
    process's undelivered replies never crowd this one's out of the page)."""

    async def read() -> list[Any]:
        async with store._sessions() as session:
            return list((await session.execute(
                select(MessageRow, ConversationRow.key)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(MessageRow.undelivered, MessageRow.reply_status != STREAMING, shards.condition())
                .order_by(MessageRow.id)
                .limit(limit)
            )).all())

    return [_to_reply(row, key) for row, key in await store._retry(read)]


async def interrupt_streaming(store: Store, shards: Shards, notice: str) -> int:
    """`Store.interrupt_streaming`, of these shards' conversations only: a process starting
    must not mark `interrupted` the replies another process is streaming right now."""
    owned = select(ConversationRow.id).where(shards.condition())

    async def work(session: Any) -> int:
        result = await session.execute(
            update(MessageRow)
            .where(MessageRow.reply_status == STREAMING, MessageRow.conversation_id.in_(owned))
            .values(reply_status="interrupted", notice=notice, undelivered=True)
        )
        return int(result.rowcount)

    return await store._write(work)
