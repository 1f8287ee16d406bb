"""What the training export reads (/channel training-export, `hermes-bot export-dataset`)."""

from __future__ import annotations

import json

from sqlalchemy import (
    and_,
    func,
    not_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.conversation import Message
from bot.storage.database import StoreBase, _reads
from bot.storage.tables import ConversationRow, MessageRow, _to_message


class ExportQueries(StoreBase):
    """The queries of this module (see its doc)."""

    # ---- training export: /channel training-export, `hermes-bot export-dataset` ----------

    async def set_training_export(self, key: str, on: bool) -> None:
        """Opt a channel in (or out) of the training dataset export."""

        async def work(session: AsyncSession) -> None:
            (await self._conversation(session, key)).training_export = on

        await self._write(work)

    @_reads
    async def training_export_conversations(self) -> list[tuple[int, str, str | None, int | None]]:
        """The opted-in conversations: (id, key, persona, forget_before_id), oldest first."""
        async with self._sessions() as session:
            rows = (await session.execute(
                select(ConversationRow.id, ConversationRow.key, ConversationRow.persona,
                       ConversationRow.forget_before_id)
                .where(ConversationRow.training_export).order_by(ConversationRow.id)
            )).all()
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    @_reads
    async def conversation_people(self, conversation_id: int) -> list[tuple[str, str]]:
        """Every (author id, display name) of the people (not the bot) stored in a
        conversation, hidden rows included, in order of first appearance; then the people
        their messages mention (not the bot)."""
        async with self._sessions() as session:
            rows = (await session.execute(
                select(MessageRow.author_id, MessageRow.author_name, func.min(MessageRow.id).label("first"))
                .where(MessageRow.conversation_id == conversation_id, MessageRow.is_bot.is_(False))
                .group_by(MessageRow.author_id, MessageRow.author_name).order_by("first")
            )).all()
            mentioned = await session.scalars(
                select(MessageRow.mentions).where(MessageRow.conversation_id == conversation_id,
                                                  MessageRow.mentions.is_not(None)).order_by(MessageRow.id)
            )
            mentioned = list(mentioned)
            own = set(await session.scalars(  # the bot itself is no person
                select(MessageRow.author_id).where(MessageRow.conversation_id == conversation_id,
                                                   MessageRow.reply_status.is_not(None)).distinct()))
        people = [(row[0], row[1]) for row in rows]
        for mentions in mentioned:  # people named in a mention who may never have written here
            people += [(str(i), str(name)) for i, name in json.loads(mentions) if str(i) not in own]
        return list(dict.fromkeys(people))

    @_reads
    async def reply_author_ids(self, conversation_id: int) -> set[str]:
        """Who wrote the bot's replies in a conversation (its own words, as against other
        bots' and webhooks' messages)."""
        async with self._sessions() as session:
            ids = await session.scalars(
                select(MessageRow.author_id).where(MessageRow.conversation_id == conversation_id,
                                                   MessageRow.reply_status.is_not(None)).distinct()
            )
            return set(ids)

    @_reads
    async def export_turns(
        self, conversation_id: int, after_id: int, limit: int
    ) -> list[tuple[int, Message, str | None, str | None]]:
        """The next `limit` messages after row `after_id` that a prompt may show (not
        deleted, no empty bot turn), oldest first: (row id, message, reply status, persona)."""
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation_id, MessageRow.id > after_id,
                       MessageRow.deleted_at.is_(None), not_(and_(MessageRow.is_bot, MessageRow.content == "")))
                .order_by(MessageRow.id).limit(limit)
            )).all()
        return [(row.id, _to_message(row), row.reply_status, row.persona) for row in rows]
