"""People: user personas (/me), attachments' text, when the bot speaks unaddressed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    delete,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.conversation import utcnow
from bot.storage.database import StoreBase, _reads
from bot.storage.tables import ConversationRow, UserPersonaRow


class PeopleQueries(StoreBase):
    """People."""

    # ---- people: user personas (/me), attachments, when to speak ------------------------

    async def set_user_persona(self, user_id: str, guild_id: str, description: str) -> None:
        """Who a person plays in a server (`guild_id` "": everywhere, their default)."""

        async def work(session: AsyncSession) -> None:
            await session.execute(
                self._insert(UserPersonaRow)
                .values(user_id=user_id, guild_id=guild_id, description=description, updated_at=utcnow())
                .on_conflict_do_update(index_elements=["user_id", "guild_id"],
                                       set_={"description": description, "updated_at": utcnow()})
            )

        await self._write(work)

    @_reads
    async def user_persona(self, user_id: str, guild_id: str) -> tuple[str, str] | None:
        """The description that applies to a person in a server (theirs there, else their
        default) and the guild id it was set for ("" for the default); None if neither."""
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(UserPersonaRow).where(UserPersonaRow.user_id == user_id,
                                             UserPersonaRow.guild_id.in_({guild_id, ""}))
            )).all()
        row = min(rows, key=lambda r: r.guild_id == "", default=None)  # the server's first
        return (row.description, row.guild_id) if row else None

    async def clear_user_persona(self, user_id: str, guild_id: str) -> bool:
        """Delete a person's description for a server ("" : their default); False if none."""
        return bool(await self._delete_user_personas(UserPersonaRow.user_id == user_id,
                                                     UserPersonaRow.guild_id == guild_id))

    @_reads
    async def user_personas_in(self, key: str, user_ids: Sequence[str]) -> dict[str, str]:
        """user id → the description that applies in this conversation's server (or, in a
        DM, the default), for the people asked about who have one."""
        if not user_ids:
            return {}
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(UserPersonaRow).where(UserPersonaRow.user_id.in_(set(user_ids)),
                                             UserPersonaRow.guild_id.in_([self._guild_of(key), ""]))
            )).all()
        chosen: dict[str, str] = {}
        for row in sorted(rows, key=lambda r: r.guild_id != ""):  # defaults, then the server's
            chosen[row.user_id] = row.description
        return chosen

    async def set_attachments(self, key: str, platform_id: str, text: str) -> bool:
        """What was read from a stored message's attached files; False if it is not stored
        (or was deleted while they were read)."""
        return await self._update_message(key, platform_id, live_only=True, attachments=text or None)

    async def set_speaking(self, key: str, reply_chance: int, follow_up_seconds: int, name_trigger: bool) -> None:
        """When the bot speaks unaddressed in a channel (`/channel speak`)."""

        async def work(session: AsyncSession) -> None:
            row = await self._conversation(session, key)
            row.reply_chance, row.follow_up_seconds, row.name_trigger = reply_chance, follow_up_seconds, name_trigger

        await self._write(work)

    @staticmethod
    def _guild_of(key: str) -> Any:
        """The conversation's server id ("" for a DM), as a subquery."""
        return (select(func.coalesce(ConversationRow.guild_id, ""))
                .where(ConversationRow.key == key).scalar_subquery())

    async def _delete_user_personas(self, *conditions: Any) -> int:
        async def work(session: AsyncSession) -> int:
            return int((await session.execute(delete(UserPersonaRow).where(*conditions))).rowcount)

        return await self._write(work)
