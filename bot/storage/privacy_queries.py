"""Deleting for good: /forget, retention and leaving a server."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    delete,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.storage.database import StoreBase
from bot.storage.tables import (
    ConversationRow,
    ImportedPersonaRow,
    MessageRow,
    UserPersonaRow,
)


class PrivacyQueries(StoreBase):
    """Deleting for good."""

    # ---- privacy: deleting for good -----------------------------------------------------

    async def forget_author(self, key: str, author_id: str, guild_id: str | None = None) -> int:
        """Delete every message of one person in a conversation (/forget), and who they
        play there (`/me`: the description for `guild_id`, by default the conversation's
        server; "" (a DM): their global default)."""
        await self._delete_user_personas(UserPersonaRow.user_id == author_id,
                                         UserPersonaRow.guild_id == (self._guild_of(key) if guild_id is None
                                                                     else guild_id))
        return await self._delete_messages(
            MessageRow.conversation_id == self._conversation_id(key), MessageRow.author_id == author_id
        )

    async def forget_conversation(self, key: str) -> int:
        """Delete a conversation's whole history (/forget everything); its settings stay."""
        return await self._delete_messages(MessageRow.conversation_id == self._conversation_id(key))

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Delete every message older than `cutoff` (RETENTION_DAYS)."""
        return await self._delete_messages(MessageRow.created_at < cutoff)

    async def purge_conversation(self, key: str) -> int:
        """A channel was deleted: its conversation and its history go."""
        return await self._delete_conversations(ConversationRow.key == key)

    async def purge_guild(self, guild_id: str) -> int:
        """The bot left (or was removed from) a server: every conversation of it goes, and
        the descriptions people set there (`/me`), and the character cards imported there."""
        await self._delete_user_personas(UserPersonaRow.guild_id == guild_id)

        async def cards(session: AsyncSession) -> None:
            await session.execute(delete(ImportedPersonaRow).where(
                ImportedPersonaRow.key.startswith(f"g{guild_id}/", autoescape=True)))

        await self._write(cards)
        return await self._delete_conversations(ConversationRow.guild_id == guild_id)

    @staticmethod
    def _conversation_id(key: str) -> Any:
        return select(ConversationRow.id).where(ConversationRow.key == key).scalar_subquery()

    async def _delete_messages(self, *conditions: Any) -> int:
        """Delete messages for good; the memory summaries of their conversations go too
        (rebuilt without them), so no deleted word survives in one."""

        async def work(session: AsyncSession) -> int:
            touched = select(MessageRow.conversation_id).where(*conditions).distinct()
            await session.execute(update(ConversationRow).where(ConversationRow.id.in_(touched))
                                  .values(memory=None, memory_until=None))
            return int((await session.execute(delete(MessageRow).where(*conditions))).rowcount)

        return await self._write(work)

    async def _delete_conversations(self, condition: Any) -> int:
        """Delete conversations and (explicitly, whatever the foreign keys do) their messages."""

        async def work(session: AsyncSession) -> int:
            ids = select(ConversationRow.id).where(condition).scalar_subquery()
            await session.execute(delete(MessageRow).where(MessageRow.conversation_id.in_(ids)))
            return int((await session.execute(delete(ConversationRow).where(condition))).rowcount)

        return await self._write(work)
