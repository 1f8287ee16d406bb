"""A reply's alternatives and Continue (the rules are in `bot.roleplay.swipes`)."""

from __future__ import annotations

from sqlalchemy import (
    delete,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.conversation import DONE, FINAL_STATES, STREAMING, StoredReply, utcnow
from bot.roleplay.swipes import SwipeView, plan_regeneration
from bot.storage.database import StoreBase, _reads
from bot.storage.tables import (
    ConversationRow,
    MessageRow,
    ReplyAlternativeRow,
    _to_reply,
)


class SwipeQueries(StoreBase):
    """A reply's alternatives and Continue (the rules are in `bot.roleplay.swipes`)."""

    # ---- swipes: a reply's alternatives, Continue (rules in bot.roleplay.swipes) ------------------

    @_reads
    async def swipe_view(self, reply_id: int) -> SwipeView:
        """The alternatives of a reply, as the buttons show them."""
        async with self._sessions() as session:
            shown = await session.scalar(select(MessageRow.swipe).where(MessageRow.id == reply_id))
            saved = await session.scalars(
                select(ReplyAlternativeRow.position).where(ReplyAlternativeRow.message_id == reply_id))
            return SwipeView.of(list(saved), shown)

    @_reads
    async def alternatives(self, reply_id: int) -> list[str]:
        """The texts of a reply's alternatives in order, the shown one as it is now."""
        async with self._sessions() as session:
            row = await session.get(MessageRow, reply_id)
            if row is None:
                return []
            saved = {a.position: a.content for a in await session.scalars(
                select(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id == reply_id))}
        view = SwipeView.of(list(saved), row.swipe)
        return [row.content if position == view.shown else saved[position] for position in view.positions]

    async def swipe_reply(self, reply_id: int, step: int) -> tuple[StoredReply, SwipeView] | None:
        """Show the alternative `step` (-1, +1) away: the shown text is saved at its position
        first, then it becomes the reply's content (the one in history), final and to be
        delivered. None past either end (or no such reply)."""

        async def work(session: AsyncSession) -> tuple[StoredReply, SwipeView] | None:
            found = (await session.execute(
                select(MessageRow, ConversationRow.key)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .where(MessageRow.id == reply_id)
            )).first()
            if found is None:
                return None
            row, key = found
            saved = {a.position: a for a in await session.scalars(
                select(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id == reply_id))}
            view = SwipeView.of(list(saved), row.swipe)
            target = view.neighbour(step)
            if target is None:
                return None
            positions = view.positions
            if row.content.strip():
                await self._save_alternative(session, row, view.shown, saved.get(view.shown))
            else:  # a try that wrote nothing is not kept as an alternative
                await session.execute(delete(ReplyAlternativeRow).where(
                    ReplyAlternativeRow.message_id == reply_id, ReplyAlternativeRow.position == view.shown))
                positions = tuple(p for p in positions if p != view.shown)
            row.content, row.swipe = saved[target].content, target
            # The take comes back as it ended: a stopped one stays stopped (its notice
            # shown, never exported as a finished answer).
            row.reply_status, row.notice, row.undelivered = saved[target].status or DONE, saved[target].notice, True
            await session.flush()
            return _to_reply(row, key), SwipeView(positions, target)

        return await self._write(work)

    @_reads
    async def latest_reply(self, key: str) -> StoredReply | None:
        """The conversation's newest reply of the bot that is not deleted (the only one
        that can be swiped or continued)."""
        async with self._sessions() as session:
            row = await session.scalar(
                select(MessageRow).where(MessageRow.conversation_id == self._conversation_id(key),
                                         MessageRow.reply_status.is_not(None), MessageRow.deleted_at.is_(None))
                .order_by(MessageRow.id.desc()).limit(1)
            )
        return _to_reply(row, key) if row else None

    async def resume_reply(self, reply_id: int) -> None:
        """Continue: the reply streams again, its text kept, more to be added after it."""
        await self._update_reply(reply_id, reply_status=STREAMING, notice=None)

    async def _keep_alternative(self, session: AsyncSession, reply_id: int) -> None:
        """Regenerate: save the shown text as an alternative (within the limit) and make
        the position of the one about to be written the shown one."""
        row = await session.get(MessageRow, reply_id)
        if row is None:
            return
        saved = {a.position: a for a in await session.scalars(
            select(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id == reply_id))}
        plan = plan_regeneration(SwipeView.of(list(saved), row.swipe), row.content)
        if plan.save_at is not None:
            await self._save_alternative(session, row, plan.save_at, saved.get(plan.save_at))
        if plan.drop:
            await session.execute(delete(ReplyAlternativeRow).where(
                ReplyAlternativeRow.message_id == reply_id, ReplyAlternativeRow.position.in_(plan.drop)))
        row.swipe = plan.new_position

    @staticmethod
    async def _save_alternative(session: AsyncSession, row: MessageRow, position: int,
                                existing: ReplyAlternativeRow | None) -> None:
        status = row.reply_status if row.reply_status in FINAL_STATES else None
        if existing is not None:
            existing.content, existing.status, existing.notice = row.content, status, row.notice
        else:
            session.add(ReplyAlternativeRow(message_id=row.id, position=position, content=row.content,
                                            status=status, notice=row.notice, created_at=utcnow()))
            await session.flush()

    async def _drop_alternatives(self, key: str, platform_id: str) -> None:
        """A reply deleted in Discord: its alternatives are erased with its text."""

        async def work(session: AsyncSession) -> None:
            ids = select(MessageRow.id).where(MessageRow.conversation_id == self._conversation_id(key),
                                              MessageRow.platform_id == platform_id).scalar_subquery()
            await session.execute(delete(ReplyAlternativeRow).where(ReplyAlternativeRow.message_id.in_(ids)))

        await self._write(work)
