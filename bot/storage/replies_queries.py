"""A reply's lifecycle in the store (`bot.edge.reply_stream` drives it) and what recovery reads
after a restart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    case,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.conversation import FINAL_STATES, STREAMING, Message, StoredReply, utcnow
from bot.storage.database import StoreBase, _reads
from bot.storage.tables import (
    ConversationGone,
    ConversationRow,
    MessageRow,
    _aware,
    _to_message,
    _to_reply,
)


class ReplyQueries(StoreBase):
    """The queries of this module (see its doc)."""

    # ---- replies: their lifecycle (bot.edge.reply_stream drives it) -------------------------

    async def begin_reply(
        self, key: str, *, author_id: str, author_name: str, reply_to: str | None, requester_id: str | None,
        persona: str | None = None,
    ) -> int:
        """A new reply, `streaming`, with no text yet; its row id. `ConversationGone` if the
        conversation is not stored (any more): the bot left its server, or it was forgotten,
        while the answer waited; it must not come back without its server."""

        began = utcnow()
        tries = 0

        async def work(session: AsyncSession) -> int:
            nonlocal tries
            tries += 1
            conversation = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if conversation is None:
                raise ConversationGone(f"conversation {key} is not stored (deleted meanwhile)")
            if tries > 1:  # a retry: the first try's commit may have landed with its answer lost
                made = await session.scalar(select(MessageRow.id).where(
                    MessageRow.conversation_id == conversation.id, MessageRow.is_bot.is_(True),
                    MessageRow.reply_status == STREAMING, MessageRow.content == "",
                    MessageRow.author_id == author_id, MessageRow.created_at >= began,
                    MessageRow.reply_to.is_(None) if reply_to is None else MessageRow.reply_to == reply_to,
                    MessageRow.persona.is_(None) if persona is None else MessageRow.persona == persona,
                ).order_by(MessageRow.id.desc()).limit(1))
                if made is not None:
                    return int(made)
            row = MessageRow(
                conversation_id=conversation.id, author_id=author_id, author_name=author_name, is_bot=True,
                content="", created_at=utcnow(), reply_status=STREAMING, reply_to=reply_to,
                requester_id=requester_id, part_ids="[]", undelivered=False, persona=persona,
            )
            session.add(row)
            await session.flush()
            return row.id

        return await self._write(work)

    async def restart_reply(self, reply_id: int, author_name: str) -> None:
        """Regenerate: the reply streams again from nothing, in the same Discord parts; the
        text it showed is kept as an alternative first, in the same transaction (swipes)."""

        async def work(session: AsyncSession) -> None:
            await self._keep_alternative(session, reply_id)
            await session.execute(update(MessageRow).where(MessageRow.id == reply_id).values(
                content="", reply_status=STREAMING, notice=None, author_name=author_name))

        await self._write(work)

    async def update_reply(self, reply_id: int, content: str, part_ids: Sequence[str]) -> None:
        """What Discord shows now: the model's text so far, in these parts."""
        await self._update_reply(reply_id, **self._shown(content, part_ids))

    async def set_part_ids(self, reply_id: int, part_ids: Sequence[str]) -> None:
        """The Discord parts of a reply (found again after a crash), its text untouched."""
        await self._update_reply(reply_id, part_ids=json.dumps(list(part_ids)),
                                 platform_id=part_ids[0] if part_ids else None)

    async def finish_reply(self, reply_id: int, status: str, content: str, notice: str | None) -> None:
        """The reply's final state; Discord is brought in step next (`mark_delivered`)."""
        if status not in FINAL_STATES:
            raise ValueError(f"not a final reply state: {status}")
        await self._update_reply(reply_id, reply_status=status, content=content, notice=notice, undelivered=True)

    async def mark_delivered(self, reply_id: int, content: str, part_ids: Sequence[str]) -> None:
        """Discord shows the reply's final state in these parts."""
        await self._update_reply(reply_id, undelivered=False, **self._shown(content, part_ids))

    @staticmethod
    def _shown(content: str, part_ids: Sequence[str]) -> dict[str, Any]:
        # The first part's id identifies the reply (edits, deletions, buttons).
        return {"content": content, "part_ids": json.dumps(list(part_ids)),
                "platform_id": part_ids[0] if part_ids else None}

    async def _update_reply(self, reply_id: int, **values: Any) -> None:
        if "content" in values:  # a reply deleted in Discord meanwhile stays without text
            text = literal(values["content"], MessageRow.__table__.c.content.type)  # cleaned like any text
            values["content"] = case((MessageRow.deleted_at.is_(None), text), else_="")

        async def work(session: AsyncSession) -> None:
            await session.execute(update(MessageRow).where(MessageRow.id == reply_id).values(**values))

        await self._write(work)
        if "part_ids" in values and len(self.late_deletions):  # a part deleted before its id came back
            reply = await self.reply(reply_id)
            if reply is not None:
                await self._erase_deleted_meanwhile(reply.key, json.loads(values["part_ids"]))

    @_reads
    async def reply(self, reply_id: int) -> StoredReply | None:
        async with self._sessions() as session:
            found = (await session.execute(
                select(MessageRow, ConversationRow.key)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(MessageRow.id == reply_id)
            )).first()
        return _to_reply(found[0], found[1]) if found else None

    @_reads
    async def reply_by_part(self, key: str, platform_id: str) -> StoredReply | None:
        """The reply whose first Discord part has this id."""
        async with self._sessions() as session:
            row = await session.scalar(
                select(MessageRow)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(ConversationRow.key == key, MessageRow.platform_id == platform_id,
                       MessageRow.reply_status.is_not(None))
            )
        return _to_reply(row, key) if row else None

    @_reads
    async def holds_part(self, key: str, platform_id: str) -> bool:
        """Whether a Discord message is stored in this conversation: as a message, or as
        any part of a reply."""
        async with self._sessions() as session:
            found = await session.scalar(
                select(MessageRow.id)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(ConversationRow.key == key,
                       or_(MessageRow.platform_id == platform_id, MessageRow.part_ids.contains(f'"{platform_id}"')))
                .limit(1)
            )
        return found is not None

    async def interrupt_streaming(self, notice: str) -> int:
        """At start: replies a crash left `streaming` are `interrupted` (and Discord is to
        be brought in step). How many there were."""

        async def work(session: AsyncSession) -> int:
            result = await session.execute(
                update(MessageRow).where(MessageRow.reply_status == STREAMING)
                .values(reply_status="interrupted", notice=notice, undelivered=True)
            )
            return int(result.rowcount)

        return await self._write(work)

    @_reads
    async def undelivered_replies(self, limit: int = 100) -> list[StoredReply]:
        """Final replies that Discord does not show as such yet, oldest first."""
        async with self._sessions() as session:
            rows = (await session.execute(
                select(MessageRow, ConversationRow.key)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(MessageRow.undelivered, MessageRow.reply_status != STREAMING)
                .order_by(MessageRow.id)
                .limit(limit)
            )).all()
        return [_to_reply(row, key) for row, key in rows]

    @_reads
    async def recovery_keys(self) -> list[str]:
        """Conversations to back-fill after a restart: enabled channels and DMs."""
        async with self._sessions() as session:
            keys = await session.scalars(
                select(ConversationRow.key).where(or_(ConversationRow.enabled, ConversationRow.is_dm))
            )
        return list(keys)

    @_reads
    async def active_keys(self, since: datetime) -> list[str]:
        """Conversations where someone wrote since `since` (one range scan of the time index)."""
        async with self._sessions() as session:
            keys = await session.scalars(
                select(ConversationRow.key).where(ConversationRow.id.in_(
                    select(MessageRow.conversation_id).where(MessageRow.created_at >= since).distinct()
                ))
            )
        return list(keys)

    @_reads
    async def newest_platform_id(self, key: str, window: int = 50) -> int | None:
        """The newest Discord message id of a person stored in a conversation (among its
        newest rows): where reading back what was missed starts. (The bot's own messages do
        not count: one it posted after a crash would hide what was said before it.)"""
        async with self._sessions() as session:
            ids = await session.scalars(
                select(MessageRow.platform_id)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(ConversationRow.key == key, MessageRow.platform_id.is_not(None),
                       MessageRow.is_bot.is_(False))
                .order_by(MessageRow.id.desc())
                .limit(window)
            )
            numbers = [int(i) for i in ids if i.isdigit()]
        return max(numbers, default=None)

    @_reads
    async def unanswered(self, key: str, since: datetime) -> Message | None:
        """The newest message from a person since `since` that no reply of the bot follows."""
        async with self._sessions() as session:
            conversation = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if conversation is None:
                return None
            newest = await session.scalar(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation.id, MessageRow.deleted_at.is_(None))
                .order_by(MessageRow.id.desc())
                .limit(1)
            )
        if newest is None or newest.is_bot or _aware(newest.created_at) < since:
            return None
        return _to_message(newest)

    @_reads
    async def last_question(self, key: str, since: datetime) -> Message | None:
        """The newest message from a person since `since`, whether replies follow it or not
        (a scene question that several characters answer in turn)."""
        async with self._sessions() as session:
            newest = await session.scalar(
                select(MessageRow)
                .where(MessageRow.conversation_id == self._conversation_id(key), MessageRow.deleted_at.is_(None),
                       MessageRow.is_bot.is_(False))
                .order_by(MessageRow.id.desc()).limit(1)
            )
        return _to_message(newest) if newest is not None and _aware(newest.created_at) >= since else None

    @_reads
    async def replied_personas(self, key: str, question_id: str) -> set[str | None]:
        """Who answered a question: the persona keys of its replies (None: not a scene's)."""
        async with self._sessions() as session:
            found = await session.scalars(
                select(MessageRow.persona).where(
                    MessageRow.conversation_id == self._conversation_id(key), MessageRow.reply_to == question_id,
                    MessageRow.reply_status.is_not(None))
            )
            return set(found)
