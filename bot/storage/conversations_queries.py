"""Conversations and their messages: get-or-create, the history window, edits and deletions,
reset, persona, enabling, imported cards."""

from __future__ import annotations

import json
import logging
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

from bot.core.conversation import ConversationState, Message, utcnow
from bot.storage.database import StoreBase, _reads
from bot.storage.tables import (
    MAX_AVATAR_BYTES,
    ConversationRow,
    ImportedPersonaRow,
    MessageRow,
    _message_values,
    _to_message,
)

log = logging.getLogger(__name__)


class ConversationQueries(StoreBase):
    """Conversations and their messages."""

    @_reads
    async def state(self, key: str) -> ConversationState:
        async with self._sessions() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
        if row is None:
            return ConversationState(key=key)
        return ConversationState(key=key, persona=row.persona, enabled=row.enabled, known=True, is_dm=row.is_dm,
                                 reply_chance=row.reply_chance or 0, follow_up_seconds=row.follow_up_seconds or 0,
                                 name_trigger=row.name_trigger)

    async def add_message(self, key: str, message: Message, is_dm: bool = False, guild_id: str | None = None) -> bool:
        """Store a message; False if a message with that platform id is already stored."""

        async def work(session: AsyncSession) -> bool:
            conversation = await self._conversation(session, key, is_dm, guild_id)
            result = await session.execute(
                self._insert(MessageRow)
                .values(**_message_values(conversation.id, message))
                .on_conflict_do_nothing(index_elements=["conversation_id", "platform_id"])
            )
            return bool(result.rowcount)

        added = await self._write(work)
        await self._erase_deleted_meanwhile(key, [message.platform_id])
        return added

    @_reads
    async def recent_messages(self, key: str, limit: int, after_id: int | None = None) -> list[Message]:
        """The newest `limit` visible messages after the forget point (and after row
        `after_id`: the turns a memory summary covers), oldest first.

        One bounded range scan of the (conversation_id, id) index: the cost does not grow
        with the number of messages stored. Replies with no text yet (just begun, or that
        only showed a notice) are left out: the model never reads an empty turn.
        """
        async with self._sessions() as session:
            conversation = await session.scalar(
                select(ConversationRow).where(ConversationRow.key == key)
            )
            if conversation is None:
                return []
            query = (
                select(MessageRow)
                .where(
                    MessageRow.conversation_id == conversation.id,
                    MessageRow.deleted_at.is_(None),
                    not_(and_(MessageRow.is_bot, MessageRow.content == "")),
                )
                .order_by(MessageRow.id.desc())
                .limit(limit)
            )
            if conversation.forget_before_id is not None:
                query = query.where(MessageRow.id > conversation.forget_before_id)
            if after_id is not None:
                query = query.where(MessageRow.id > after_id)
            rows = (await session.scalars(query)).all()
        return [_to_message(row) for row in reversed(rows)]

    async def edit_message(self, key: str, platform_id: str, content: str) -> bool:
        """Replace a stored message's content; False if it is not stored."""
        return await self._update_message(key, platform_id, live_only=True, content=content, edited_at=utcnow())

    async def delete_message(self, key: str, platform_id: str) -> bool:
        """A message deleted in Discord: its text is erased; a tombstone without text (ids
        and time) remains, so it never reaches a prompt again. A later part of a long reply
        erases the whole reply (its text is stored once, unsplit)."""
        deleted = platform_id
        platform_id = await self._reply_of_part(key, platform_id) or platform_id
        erased = await self._update_message(key, platform_id, content="", notice=None, attachments=None,
                                            deleted_at=utcnow())
        if not erased:  # not stored (yet?): erased when it is (bot.storage.late_deletions)
            self.late_deletions.add(deleted)
            return False
        await self._drop_alternatives(key, platform_id)
        await self._forget_memory_of_message(key, platform_id)
        return erased

    async def _erase_deleted_meanwhile(self, key: str, platform_ids: Sequence[str | None]) -> None:
        """Ids just stored that Discord had already reported deleted: erase them now."""
        for platform_id in self.late_deletions.take(platform_ids):
            log.info("%s: message %s was deleted in Discord before it was stored; erasing it", key, platform_id)
            await self.delete_message(key, platform_id)

    @_reads
    async def _reply_of_part(self, key: str, platform_id: str) -> str | None:
        """The first part's id of the reply that has `platform_id` as a later part."""
        async with self._sessions() as session:
            return await session.scalar(
                select(MessageRow.platform_id).where(
                    MessageRow.conversation_id == self._conversation_id(key), MessageRow.reply_status.is_not(None),
                    MessageRow.platform_id != platform_id, MessageRow.part_ids.contains(f'"{platform_id}"'))
                .limit(1)
            )

    async def _update_message(self, key: str, platform_id: str, live_only: bool = False, **values: object) -> bool:
        """Update a stored message; `live_only`: not if it was deleted meanwhile (an edit or
        a file read that arrives after the deletion must not bring text back)."""

        async def work(session: AsyncSession) -> bool:
            conversation_id = select(ConversationRow.id).where(ConversationRow.key == key)
            conditions = [MessageRow.conversation_id == conversation_id.scalar_subquery(),
                          MessageRow.platform_id == platform_id]
            if live_only:
                conditions.append(MessageRow.deleted_at.is_(None))
            result = await session.execute(update(MessageRow).where(*conditions).values(**values))
            return bool(result.rowcount)

        return await self._write(work)

    async def reset(self, key: str) -> None:
        """Forget everything stored so far in this conversation (kept, but hidden)."""

        async def work(session: AsyncSession) -> None:
            conversation = await self._conversation(session, key)
            newest = await session.scalar(
                select(func.max(MessageRow.id)).where(MessageRow.conversation_id == conversation.id)
            )
            conversation.forget_before_id = newest
            conversation.memory = conversation.memory_until = None

        await self._write(work)

    async def set_persona(self, key: str, persona: str | None) -> None:
        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key)).persona = persona

        await self._write(work)

    async def set_enabled(self, key: str, enabled: bool) -> None:
        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key)).enabled = enabled

        await self._write(work)

    async def save_imported_persona(self, key: str, card: dict[str, Any], filename: str, user_id: str,
                                    avatar: bytes | None = None) -> None:
        """Store (or replace) an imported character card under `key`, with its image (a PNG
        card's bytes, at most `MAX_AVATAR_BYTES`, else none)."""

        async def work(session: AsyncSession) -> None:
            row = await session.scalar(select(ImportedPersonaRow).where(ImportedPersonaRow.key == key))
            if row is None:
                row = ImportedPersonaRow(key=key)
                session.add(row)
            row.card, row.filename, row.imported_by = json.dumps(card), filename[:200], user_id
            row.avatar = avatar if avatar is not None and len(avatar) <= MAX_AVATAR_BYTES else None

        await self._write(work)

    @_reads
    async def imported_personas(self) -> dict[str, dict[str, Any]]:
        """Every imported card, key → card JSON object."""
        async with self._sessions() as session:
            rows = (await session.scalars(select(ImportedPersonaRow).order_by(ImportedPersonaRow.key))).all()
        return {row.key: json.loads(row.card) for row in rows}

    @_reads
    async def enabled_keys(self) -> set[str]:
        async with self._sessions() as session:
            keys = await session.scalars(select(ConversationRow.key).where(ConversationRow.enabled))
        return set(keys)
