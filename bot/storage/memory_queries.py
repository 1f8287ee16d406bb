"""Long memory and the author's note (`bot.roleplay.memory`, `bot.roleplay.author_note`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    and_,
    func,
    not_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.conversation import Message
from bot.roleplay.author_note import DEFAULT_DEPTH as DEFAULT_NOTE_DEPTH
from bot.roleplay.author_note import DEFAULT_EVERY as DEFAULT_NOTE_EVERY
from bot.roleplay.author_note import AuthorNote
from bot.roleplay.memory import MemoryState
from bot.storage.database import StoreBase, _reads
from bot.storage.tables import ConversationRow, MessageRow, _to_message


class MemoryQueries(StoreBase):
    """The queries of this module (see its doc)."""

    # ---- memory and author's note (bot.roleplay.memory, bot.roleplay.author_note) --------------------------

    @_reads
    async def prompt_extras(self, key: str) -> tuple[MemoryState, AuthorNote, int]:
        """The conversation's memory summary, its author's note, and how many messages people
        wrote in it since the forget point (counted only when the note's frequency needs it)."""
        async with self._sessions() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if row is None:
                return MemoryState(), AuthorNote(), 0
            note = AuthorNote(row.author_note or "",
                              DEFAULT_NOTE_DEPTH if row.author_note_depth is None else row.author_note_depth,
                              DEFAULT_NOTE_EVERY if row.author_note_every is None else row.author_note_every)
            turns = 0
            if note.text and note.every > 1:
                turns = await session.scalar(
                    select(func.count(MessageRow.id)).where(
                        MessageRow.conversation_id == row.id, MessageRow.is_bot.is_(False),
                        MessageRow.deleted_at.is_(None), MessageRow.id > (row.forget_before_id or 0))
                ) or 0
        return MemoryState(row.memory or "", row.memory_until), note, turns

    @staticmethod
    def _visible_after(conversation: ConversationRow, after_id: int | None) -> list[Any]:
        return [MessageRow.conversation_id == conversation.id, MessageRow.deleted_at.is_(None),
                not_(and_(MessageRow.is_bot, MessageRow.content == "")),
                MessageRow.id > max(after_id or 0, conversation.forget_before_id or 0)]

    @_reads
    async def memory_rows(self, key: str, keep: int, limit: int) -> tuple[MemoryState, list[tuple[int, Message]]]:
        """The memory now, and the visible messages it does not cover yet, except the newest
        `keep`: the newest `limit` of those, oldest first, with their row ids."""
        async with self._sessions() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if row is None:
                return MemoryState(), []
            rows = (await session.scalars(
                select(MessageRow).where(*self._visible_after(row, row.memory_until))
                .order_by(MessageRow.id.desc()).offset(keep).limit(limit)
            )).all()
        return MemoryState(row.memory or "", row.memory_until), [(r.id, _to_message(r)) for r in reversed(rows)]

    async def save_memory(
        self, key: str, summary: str, *, since: int | None, covered: Sequence[int]
    ) -> bool:
        """Store a summary (covering everything up to the last row of `covered`) made from
        the visible messages `covered` (row ids, oldest first), unless meanwhile the memory
        changed (cleared, /reset, another summary; it covered up to `since`) or the visible
        messages of that range are no longer exactly those (one deleted or forgotten, a
        regenerated reply back). Whether it was stored."""
        first, until = covered[0], covered[-1]

        async def work(session: AsyncSession) -> bool:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if row is None or row.memory_until != since:
                return False
            still = set(await session.scalars(select(MessageRow.id).where(
                *self._visible_after(row, first - 1), MessageRow.id <= until)))
            if still != set(covered):
                return False
            row.memory, row.memory_until = summary, until
            return True

        return await self._write(work)

    async def clear_memory(self, key: str) -> bool:
        """Drop the summary (/memory clear); it is rebuilt when the history overflows again.
        Whether there was one."""

        async def work(session: AsyncSession) -> bool:
            result = await session.execute(
                update(ConversationRow).where(ConversationRow.key == key, ConversationRow.memory.is_not(None))
                .values(memory=None, memory_until=None))
            return bool(result.rowcount)

        return await self._write(work)

    async def _forget_memory_of_message(self, key: str, platform_id: str) -> None:
        """A message deleted in Discord that the summary covers: the summary goes."""

        async def work(session: AsyncSession) -> None:
            covered = select(MessageRow.id).where(
                MessageRow.conversation_id == ConversationRow.id, MessageRow.platform_id == platform_id,
                MessageRow.id <= ConversationRow.memory_until).exists()
            await session.execute(update(ConversationRow).where(ConversationRow.key == key, covered)
                                  .values(memory=None, memory_until=None))

        await self._write(work)

    async def set_author_note(self, key: str, note: AuthorNote, is_dm: bool = False, guild_id: str | None = None) -> None:
        """Set (or, with empty text, remove) the conversation's author's note."""

        async def work(session: AsyncSession) -> None:
            row = await self._conversation(session, key, is_dm, guild_id)
            row.author_note = note.text or None
            row.author_note_depth, row.author_note_every = note.depth, note.every

        await self._write(work)
