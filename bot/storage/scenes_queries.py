"""Scenes: several characters in a channel (the rules are in `bot.roleplay.scenes`)."""

from __future__ import annotations

from sqlalchemy import (
    delete,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.storage.database import StoreBase, _reads
from bot.storage.tables import (
    ConversationRow,
    ImportedPersonaRow,
    MessageRow,
    SceneMemberRow,
)


class SceneQueries(StoreBase):
    """Scenes."""

    # ---- scenes: several characters in a channel (rules in bot.roleplay.scenes) -------------------

    @_reads
    async def scene(self, key: str) -> tuple[list[str], str | None]:
        """A conversation's scene: its characters' persona keys in listed order, and its
        strategy (None: the default)."""
        async with self._sessions() as session:
            conversation = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if conversation is None:
                return [], None
            members = await session.scalars(
                select(SceneMemberRow.persona).where(SceneMemberRow.conversation_id == conversation.id)
                .order_by(SceneMemberRow.position, SceneMemberRow.id)
            )
            return list(members), conversation.scene_strategy

    async def add_scene_member(self, key: str, persona: str, guild_id: str | None, limit: int) -> bool:
        """Add a character at the end of the scene; False if it is there already or the
        scene has `limit` characters."""

        async def work(session: AsyncSession) -> bool:
            conversation = await self._conversation(session, key, guild_id=guild_id)
            members = (await session.scalars(
                select(SceneMemberRow).where(SceneMemberRow.conversation_id == conversation.id))).all()
            if len(members) >= limit or any(m.persona == persona for m in members):
                return False
            position = max((m.position for m in members), default=-1) + 1
            session.add(SceneMemberRow(conversation_id=conversation.id, persona=persona, position=position))
            return True

        return await self._write(work)

    async def remove_scene_member(self, key: str, persona: str) -> bool:
        async def work(session: AsyncSession) -> bool:
            result = await session.execute(delete(SceneMemberRow).where(
                SceneMemberRow.conversation_id == self._conversation_id(key), SceneMemberRow.persona == persona))
            return bool(result.rowcount)

        return await self._write(work)

    async def set_scene_strategy(self, key: str, strategy: str, guild_id: str | None = None) -> None:
        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key, guild_id=guild_id)).scene_strategy = strategy

        await self._write(work)

    @_reads
    async def scene_speakers(self, key: str, limit: int = 50) -> list[str]:
        """The characters of the newest `limit` replies that named one, oldest first."""
        async with self._sessions() as session:
            personas = await session.scalars(
                select(MessageRow.persona)
                .where(MessageRow.conversation_id == self._conversation_id(key), MessageRow.is_bot,
                       MessageRow.persona.is_not(None), MessageRow.deleted_at.is_(None))
                .order_by(MessageRow.id.desc()).limit(limit)
            )
            return [p for p in reversed(list(personas)) if p]

    @_reads
    async def part_persona(self, key: str, platform_id: str) -> str | None:
        """The character that spoke in the reply with this Discord part (None: none, or not a reply)."""
        async with self._sessions() as session:
            return await session.scalar(
                select(MessageRow.persona)
                .where(MessageRow.conversation_id == self._conversation_id(key), MessageRow.is_bot,
                       or_(MessageRow.platform_id == platform_id, MessageRow.part_ids.contains(f'"{platform_id}"')))
                .limit(1)
            )

    @_reads
    async def imported_avatar(self, key: str) -> bytes | None:
        """The image of an imported PNG card (None for JSON cards and shipped personas)."""
        async with self._sessions() as session:
            return await session.scalar(select(ImportedPersonaRow.avatar).where(ImportedPersonaRow.key == key))
