"""After a restart or a crash, and while Discord has bad moments: nothing stays lost.

At start:
1. before connecting (so no reply of this run can be mistaken for one): replies a crash
   left `streaming` become `interrupted` in the store;
then once the gateway is ready, in this order (nothing is posted before the back-fill has
read Discord, so nothing the bot posts can hide what people said):
2. enabled channels and DMs are back-filled from Discord (see 4);
3. every reply whose final state Discord does not show yet gets it: Stop removed,
   parts that a crash posted before their ids were stored adopted (not sent twice),
   Regenerate live, the notice shown, missing parts sent (`sync_reply`);
4. (back-fill) with what was said while the bot was down (`channel.history(after=the
   newest stored message of a person)`); then, in every conversation active within
   RECOVERY_WINDOW_SECONDS, the newest question that no reply follows is answered, once
   (this also covers questions that were still waiting when the bot stopped).
Then, every `REDELIVER_SECONDS`, replies that Discord could not take in time are tried
again.

Sharded over several processes (SHARD_IDS), each process does all of this only for the
conversations of its own shards (`bot.edge.sharding`): the database is shared, and a question
must be answered once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import discord

from bot.core.conversation import INTERRUPTED, STREAMING, Message, StoredReply, utcnow
from bot.core.policy import channel_of
from bot.edge.answering import Question
from bot.edge.convert import read_attachments, to_message
from bot.edge.reply_stream import INTERRUPTED_NOTICE, Destination, sync_reply
from bot.edge.sharding import (
    Shards,
    interrupt_streaming,
    owned_keys,
    undelivered_replies,
)
from bot.edge.webhooks import webhook_name
from bot.roleplay.scenes import MAX_ADDRESSED, Member, named_in
from bot.storage.reconnect import DatabaseUnavailable
from bot.storage.store import Store

if TYPE_CHECKING:
    from bot.edge.bot import HermesBot
    from bot.edge.webhooks import WebhookDirectory
    from bot.lifecycle.channel_queue import ChannelQueue


class ChatSide(Protocol):
    """What recovery uses of the Chat cog (which builds it: recovery does not import it)."""

    accepting: bool
    lanes: ChannelQueue
    reading: asyncio.Semaphore
    webhooks: WebhookDirectory

    def destination_of(self, reply: StoredReply) -> Destination | None: ...

    def is_under_way(self, reply_id: int) -> bool: ...

    def queue_answer(self, question: Question, channel: discord.abc.Messageable | None = None) -> None: ...

log = logging.getLogger(__name__)
REDELIVER_SECONDS = 10.0
DATABASE_PING_SECONDS = 2.0  # how often a recovery waiting for the database asks again
BACKFILL_LIMIT = 500  # messages read back per conversation at most
ORPHAN_LOOKAHEAD = 20  # messages read after an interrupted reply, looking for its unknown parts


class Recovery:
    """Start-up recovery and periodic redelivery for one bot process (see the module doc)."""

    def __init__(self, bot: HermesBot, store: Store, chat: ChatSide) -> None:
        self.bot = bot
        self.store = store
        self.chat = chat
        self.shards = Shards.of(bot.settings)  # None: every conversation is this process's
        self._startup: asyncio.Task[None] | None = None
        self._redeliver: asyncio.Task[None] | None = None
        self._queued: dict[int, str] = {}  # reply id → its conversation: waiting in the lane

    async def before_connect(self) -> None:
        if self.shards is None:
            interrupted = await self.store.interrupt_streaming(INTERRUPTED_NOTICE)
        else:
            interrupted = await interrupt_streaming(self.store, self.shards, INTERRUPTED_NOTICE)
        if interrupted:
            log.info("recovery: %d replies were cut off by the last stop; marking them interrupted", interrupted)

    def start(self) -> None:
        """On (every) READY: the first time, recover; keep redelivering in the background."""
        if self._startup is None:
            self._startup = asyncio.create_task(self._recover(), name="recovery")

    def stop(self) -> list[asyncio.Task[None]]:
        """Shutting down: the periodic redelivery ends now; the start-up recovery, if it is
        still running, is returned to be waited for (its answers go through the lanes)."""
        if self._redeliver is not None:
            self._redeliver.cancel()
        return [self._startup] if self._startup is not None and not self._startup.done() else []

    async def _recover(self) -> None:
        while True:
            try:
                await self.backfill_all()
                await self.adopt_orphans()
                await self.redeliver()
                await self.answer_unanswered()
            except DatabaseUnavailable as error:  # each step is safe to run again
                log.warning("recovery at start waits for the database: %s", error)
                while self.chat.accepting and not await self.store.ping():
                    await asyncio.sleep(DATABASE_PING_SECONDS)
                if self.chat.accepting:
                    continue
            except Exception:
                log.exception("recovery at start failed")
            break
        self._redeliver = asyncio.create_task(self._redeliver_forever(), name="redelivery")

    async def _redeliver_forever(self) -> None:
        while self.chat.accepting:
            await asyncio.sleep(REDELIVER_SECONDS)
            try:
                await self.redeliver()
            except Exception:
                log.exception("redelivery failed")

    async def redeliver(self) -> int:
        """Bring Discord in step with every stored final reply it does not show yet. Each
        is queued in its conversation's lane and read again there: a swipe, a Continue or a
        Regenerate (lane jobs too) may change it meanwhile, and an older copy must never be
        shown or stored over it. How many were queued."""
        queued = 0
        replies = (await self.store.undelivered_replies() if self.shards is None
                   else await undelivered_replies(self.store, self.shards))
        waiting = set(self._queued.values())
        for reply in replies:
            if not self.chat.accepting:
                break
            if self.chat.is_under_way(reply.id) or reply.id in self._queued or reply.key in waiting:
                continue  # being delivered, or waiting in its lane (one per conversation at a time)
            waiting.add(reply.key)
            self._queued[reply.id] = reply.key
            if self.chat.lanes.other(reply.key, functools.partial(self._redeliver_one, reply.id)):
                queued += 1
            else:  # the lane is full: next round
                self._queued.pop(reply.id, None)
        return queued

    async def _redeliver_one(self, reply_id: int) -> None:
        try:
            reply = await self.store.reply(reply_id)
            if reply is None or not reply.undelivered or reply.status == STREAMING or self.chat.is_under_way(reply_id):
                return
            to = self.chat.destination_of(reply)
            if to is None:
                return
            try:
                # One try per call: this runs in the conversation's lane, ahead of new answers
                # and buttons; the next round (every REDELIVER_SECONDS) tries again.
                if await sync_reply(self.store, reply, to, 0):
                    log.info("delivered stored reply %d, which Discord had not shown", reply_id)
            except discord.HTTPException as error:  # 403: the bot may not post there any more
                log.warning("reply %d cannot be delivered (%s); giving up on it", reply_id, error)
                await self.store.mark_delivered(reply_id, reply.content, list(reply.part_ids))
        finally:
            self._queued.pop(reply_id, None)

    async def adopt_orphans(self) -> int:
        """A crash between Discord taking a new part of a reply and the store recording
        its id leaves that part in Discord, unknown: it would keep a live Stop button and
        be posted again. Read the channel after the reply's last known part and adopt the
        bot's messages there that nothing stored holds."""
        adopted = 0
        replies = (await self.store.undelivered_replies() if self.shards is None
                   else await undelivered_replies(self.store, self.shards))
        for reply in replies:
            if reply.status != INTERRUPTED or not self.chat.accepting:
                continue
            to = self.chat.destination_of(reply)
            if to is None:
                continue
            try:
                found = await self._orphans_of(reply, to)
            except (discord.HTTPException, OSError) as error:
                log.warning("cannot read back after reply %d (%s)", reply.id, error)
                continue
            if found:
                log.info("recovery: reply %d had %d part(s) in Discord that the crash kept from the store",
                         reply.id, len(found))
                await self.store.set_part_ids(reply.id, [*reply.part_ids, *found])
                adopted += len(found)
        return adopted

    async def _orphans_of(self, reply: StoredReply, to: Destination) -> list[str]:
        """The unknown bot messages right after the reply's last stored part (or after its
        question, when no part was stored): the first part is the one answering the question.
        A scene character's parts are its webhook's posts under its name (a webhook cannot
        post a Discord reply: its first part answers no message)."""
        anchor = reply.part_ids[-1] if reply.part_ids else reply.reply_to
        me = self.bot.user
        if anchor is None or me is None:
            return []
        found: list[str] = []
        channel = self.bot.get_partial_messageable(int(channel_of(reply.key) or 0))
        async for message in channel.history(after=discord.Object(int(anchor)), limit=ORPHAN_LOOKAHEAD,
                                             oldest_first=True):
            if reply.persona is None and message.author.id != me.id:
                continue
            if reply.persona is not None and not (self.chat.webhooks.owns(message)
                                                  and message.author.name == webhook_name(reply.author_name)):
                continue
            if await self.store.holds_part(reply.key, str(message.id)):
                break  # a later reply's: nothing of this one comes after it
            answers = message.reference.message_id if message.reference else None
            first = not reply.part_ids and not found
            if (first and answers != (to.question_id if reply.persona is None else None)) or (
                    not first and answers is not None):
                break
            found.append(str(message.id))
        return found

    async def backfill_all(self) -> None:
        for key in await self._own(await self.store.recovery_keys()):
            channel_id = channel_of(key)
            if channel_id is None or not self.chat.accepting:
                continue
            try:
                added = await self.backfill(key, channel_id)
            except (discord.HTTPException, OSError) as error:
                log.warning("cannot read back %s (%s)", key, error)
                continue
            if added:
                log.info("recovery: %d messages in %s arrived while the bot was down", added, key)

    async def answer_unanswered(self) -> None:
        since = utcnow() - timedelta(seconds=self.bot.settings.recovery_window_seconds)
        for key in await self._own(await self.store.active_keys(since)):
            channel_id = channel_of(key)
            question = await self.store.unanswered(key, since) or await self._named_left_unanswered(key, since)
            if channel_id is None or question is None or question.platform_id is None or not self.chat.accepting:
                continue
            state = await self.store.state(key)
            log.info("recovery: answering the unanswered question %s in %s", question.platform_id, key)
            self.chat.queue_answer(Question(key, channel_id, int(question.platform_id), int(question.author_id),
                                            question.author_name, read_context=not (state.enabled or state.is_dm),
                                            text=question.content))  # a scene: who is named answers

    async def _named_left_unanswered(self, key: str, since: datetime) -> Message | None:
        """A scene question that named several characters, some of whom had not answered
        when the bot stopped: it is answered again, by those (`Answerer` skips the others)."""
        question = await self.store.last_question(key, since)
        if question is None or question.platform_id is None:
            return None
        members, _ = await self.store.scene(key)
        personas = self.bot.responder.personas
        named = named_in(question.content, [Member(k, personas[k].name) for k in members if k in personas])
        answered = await self.store.replied_personas(key, question.platform_id)
        return question if any(m.key not in answered for m in named[:MAX_ADDRESSED]) else None

    async def _own(self, keys: list[str]) -> list[str]:
        """The keys of conversations this process looks after (all, unless sharded)."""
        return keys if self.shards is None else await owned_keys(self.store, self.shards, keys)

    async def backfill(self, key: str, channel_id: int) -> int:
        """Store what Discord has in this channel after the newest stored message."""
        after = await self.store.newest_platform_id(key)
        if after is None:
            return 0
        me = self.bot.user
        channel = self.bot.get_partial_messageable(channel_id)
        added = 0
        async for message in channel.history(after=discord.Object(after), limit=BACKFILL_LIMIT, oldest_first=True):
            if (me is not None and message.author.id == me.id) or self.chat.webhooks.owns(message):
                continue  # the bot's own replies (its scene characters' too) are stored by the reply path
            if message.author.bot and not self.bot.settings.reply_to_bots:
                continue
            if await self.store.add_message(key, to_message(message)):
                added += 1
                if message.attachments:  # read as on arrival (bounded: bot.roleplay.attachments)
                    await self.store.set_attachments(key, str(message.id), await read_attachments(message, self.chat.reading))
        return added
