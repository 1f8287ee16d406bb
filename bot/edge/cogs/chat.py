"""Chat: Discord messages in, streamed replies out — the thin wiring between discord.py's
events and the core.

`on_message` converts the message at the edge, stores it, asks the policy whether to
answer, and queues the answer in the conversation's lane (`bot.lifecycle.channel_queue`: one reply
at a time, newer questions coalesced). `bot.edge.answering` writes the reply through
`bot.edge.reply_stream`, which keeps Discord and the store in step. Edits and deletions in
Discord update the stored history; Stop and Regenerate act on the reply's first message.
At start, `bot.edge.recovery` finishes what a crash left and answers what arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref

import discord
from discord.ext import commands

from bot.core.conversation import StoredReply
from bot.core.fair_use import ChatGate
from bot.core.policy import (
    FollowUps,
    Speaking,
    channel_of,
    conversation_key,
    should_reply,
    should_store,
    speaks_unaddressed,
)
from bot.edge.answering import Answerer, Question
from bot.edge.bot import HermesBot
from bot.edge.convert import (
    Arrival,
    arrive,
    interaction_is_admin,
    read_attachments,
    to_message,
)
from bot.edge.delivery import retried
from bot.edge.held_messages import HeldMessages
from bot.edge.recovery import Recovery
from bot.edge.reply_stream import NO_PINGS, Destination
from bot.edge.webhooks import WebhookDirectory
from bot.lifecycle.channel_queue import ChannelQueue
from bot.roleplay.attachments import MAX_FILE_BYTES, MAX_FILES, READS_AT_ONCE, unread
from bot.storage.reconnect import DatabaseUnavailable
from bot.telemetry import metrics
from bot.storage.retention import purge_forever

log = logging.getLogger(__name__)
FILES_WAIT_SECONDS = 30.0  # how long an answer waits for files still being read


class Chat(commands.Cog):
    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.store = bot.responder.store
        self.lanes = ChannelQueue()
        self.answerer: Answerer | None = None  # once the bot knows its own id
        # Scene characters' webhooks (bot.edge.webhooks): their posts are the bot's own words.
        self.webhooks = WebhookDirectory(bot, self.store.imported_avatar, bot.settings.delivery_retry_seconds)
        self.recovery = Recovery(bot, self.store, self)
        self.accepting = True
        self._retention: asyncio.Task[None] | None = None
        settings = bot.settings
        self.gate = ChatGate(settings.user_messages_per_minute,
                             settings.user_queue_share or max(1, settings.max_queue // 4), settings.bot_reply_limit)
        # Messages of a channel are handled in the order Discord sent them (discord.py runs
        # each listener as its own task; without this, storing could reorder them).
        self._arrivals: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._arriving: set[asyncio.Task[object]] = set()  # messages being stored: a shutdown waits for them
        self.follow_ups = FollowUps()  # whom the bot last answered per channel (/channel speak)
        self.chance = random.random
        self.reading = asyncio.Semaphore(READS_AT_ONCE)  # attached files read at once
        self._reads: dict[str, set[asyncio.Task[None]]] = {}  # per conversation: files being read
        # Messages that arrived while the database was away past its retries (bot.edge.held_messages).
        self.held: HeldMessages[tuple[discord.Message, Arrival]] = HeldMessages(self._arrive_again, self.store.ping)

    def get_answerer(self) -> Answerer:
        if self.answerer is None:
            me = self.bot.user
            assert me is not None, "the bot is not logged in"
            self.answerer = Answerer(self.bot.responder, me.id, self.bot.settings.delivery_retry_seconds,
                                     self.bot.edit_interval, self.webhooks)
        return self.answerer

    def destination_of(self, reply: StoredReply) -> Destination | None:
        """Where a stored reply is shown: its channel, or a scene character's webhook there."""
        channel_id = channel_of(reply.key)
        if channel_id is None:
            return None
        channel = self.bot.get_partial_messageable(channel_id)
        return Destination(
            channel,
            int(reply.reply_to) if reply.reply_to else None,
            int(reply.requester_id or 0),
            self.webhooks.poster(channel, channel_id, reply.persona, reply.author_name) if reply.persona else None,
        )

    def is_under_way(self, reply_id: int) -> bool:
        return self.answerer is not None and self.answerer.is_under_way(reply_id)

    # ---- listening ---------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        self.recovery.start()
        if self._retention is None:
            self._retention = asyncio.create_task(purge_forever(self.store, self.bot.settings.retention_days))

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None or message.author.id == me.id:
            return
        came = arrive(message, me)  # the one conversion: the path below reads `came`
        if not self.bot.allowed_guild(came.guild_id) or self.webhooks.owns(message):
            return  # another server, or a scene character's reply (stored by the reply path)
        metrics.MESSAGES.inc()
        task = asyncio.current_task()
        if task is not None:
            self._arriving.add(task)
            task.add_done_callback(self._arriving.discard)
        if len(self.held):  # behind those kept while the database was away: Discord's order
            if not self.held.hold((message, came)):
                await self._notify(message, "*(I could not save your message; please send it again in a minute)*")
            return
        try:
            await self._arrive(message, came)
        except DatabaseUnavailable:
            if not self.held.hold((message, came)):
                await self._notify(message, "*(I could not save your message; please send it again in a minute)*")

    async def _arrive_again(self, kept: tuple[discord.Message, Arrival]) -> None:
        """A message kept while the database was away, now that it answers again."""
        await self._arrive(*kept)

    async def _arrive(self, message: discord.Message, came: Arrival) -> None:
        """Store the message if it is to be kept, and queue its answer if it is to be answered;
        `DatabaseUnavailable` when the database stayed away past the retries (nothing done).
        Everything is read from `came`; the discord.py object is kept only to talk back (a
        notice, the answer's channel, reading the files)."""
        key = conversation_key(came.channel_id)
        arrival = self._arrivals.setdefault(came.channel_id, asyncio.Lock())
        async with arrival:
            state = await self.store.state(key)
            incoming = came.incoming(state.enabled)
            reply_to_bots = self.bot.settings.reply_to_bots
            answering = should_reply(incoming, reply_to_bots) or bool(speaks_unaddressed(
                incoming, came.text,
                Speaking(state.reply_chance, state.follow_up_seconds, state.name_trigger),
                await self._names(key, state.persona, state.name_trigger and not state.enabled),
                self.follow_ups.within(came.channel_id, came.author_id, time.monotonic(), state.follow_up_seconds),
                self.chance, reply_to_bots))
            stored = should_store(incoming, reply_to_bots) or answering
            if stored:
                try:
                    await self.store.add_message(key, came.message, is_dm=came.is_dm,
                                                 guild_id=str(came.guild_id) if came.guild_id else None)
                except DatabaseUnavailable:
                    raise  # kept by on_message until the database is back
                except Exception:  # the database stayed locked past every retry
                    log.exception("could not store message %d in %s", came.platform_id, key)
                    await self._notify(message, "*(I could not save your message; please send it again in a minute)*")
                    return
        if stored and came.attachments:
            # Read beside the answer, not before it: the answer's order in the lane is the
            # message's, and its prompt waits for the files (`_files_read`).
            self._track_read(key, asyncio.create_task(self._read_files(key, message)))
        if not answering:
            return
        under_way = self.answerer.under_way_for(came.author_id) if self.answerer else 0
        verdict = self.gate.check(key, came.author_id, came.author_bot, under_way, time.monotonic())
        if verdict is None:
            if skipped := unread(list(came.attachments)):
                await self._notify(message, f"*(I read text files only, up to {MAX_FILE_BYTES // 1024} KiB each, "
                                            f"{MAX_FILES} per message: {', '.join(skipped)} not read)*")
            # Outside DMs and enabled channels, the chat around the question is read from
            # Discord when answering (it is not stored).
            self.queue_answer(Question(key, came.channel_id, came.platform_id, came.author_id, came.author_name,
                                       read_context=not (incoming.is_dm or incoming.channel_enabled),
                                       text=came.text, replied_to=came.reference_id),
                              message.channel)
        elif verdict:
            await self._notify(message, verdict)

    async def _names(self, key: str, persona: str | None, with_scene: bool) -> list[str]:
        """The names that trigger a reply (/channel speak name): the persona's, and with
        `with_scene` its scene characters' (read only then: one query)."""
        keys = [persona, *((await self.store.scene(key))[0] if with_scene else [])]
        return [self.bot.responder.persona(k).name for k in keys]

    async def _notify(self, message: discord.Message, notice: str) -> None:
        """A short notice for a person (not stored: notices are never the bot's words)."""
        reference = message.to_reference(fail_if_not_exists=False)
        try:
            await retried(lambda: message.channel.send(notice, reference=reference, mention_author=False,
                                                       allowed_mentions=NO_PINGS), "send a notice",
                          self.bot.settings.delivery_retry_seconds)
        except (discord.HTTPException, OSError) as error:
            log.warning("could not tell %s: %s", message.author, error)

    def queue_answer(self, question: Question, channel: discord.abc.Messageable | None = None) -> None:
        """Answer in the question's lane (coalesced with newer questions there)."""
        if not self.accepting:
            log.info("%s: shutting down; the stored question is answered after the restart", question.key)
            return
        channel = channel or self.bot.get_partial_messageable(question.channel_id)

        async def answer() -> None:
            await self._files_read(question.key)
            await self.get_answerer().answer(question, channel)
            self.follow_ups.answered(question.channel_id, question.author_id, time.monotonic())

        self.lanes.answer(question.key, answer, question.message_id or 0)

    async def _read_files(self, key: str, message: discord.Message) -> None:
        try:
            await self.store.set_attachments(key, str(message.id), await read_attachments(message, self.reading))
        except Exception:  # the message itself is stored, with a note for each file
            log.exception("could not store the attachments of message %d in %s", message.id, key)

    def _track_read(self, key: str, task: asyncio.Task[None]) -> None:
        reads = self._reads.setdefault(key, set())
        reads.add(task)

        def done(task: asyncio.Task[None]) -> None:
            reads.discard(task)
            if not reads and self._reads.get(key) is reads:
                del self._reads[key]

        task.add_done_callback(done)

    async def _files_read(self, key: str) -> None:
        """Wait (at most FILES_WAIT_SECONDS) for the files of this conversation's messages
        that are still being read, so that the prompt has them."""
        if reads := self._reads.get(key):
            await asyncio.wait(set(reads), timeout=FILES_WAIT_SECONDS)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if "content" not in payload.data or (self.bot.user and payload.message.author.id == self.bot.user.id):
            return  # the bot's own replies are stored by the reply path
        if self.webhooks.owns(payload.message):
            return  # so are its scene characters'
        key = conversation_key(payload.channel_id)
        await self.store.edit_message(key, str(payload.message_id), to_message(payload.message).content)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.store.delete_message(conversation_key(payload.channel_id), str(payload.message_id))

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        key = conversation_key(payload.channel_id)
        for message_id in payload.message_ids:
            await self.store.delete_message(key, str(message_id))

    @commands.Cog.listener()
    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        await self._purge_channel(channel.id)

    @commands.Cog.listener()
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        await self._purge_channel(payload.thread_id)

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        """Removed from a server (or left it): that server's history is deleted."""
        purged = await self.store.purge_guild(str(guild.id))
        personas = self.bot.responder.personas  # the cards imported there go with it
        for key in [k for k in personas if k.startswith(f"g{guild.id}/")]:
            del personas[key]
        log.info("left server %d: deleted the history of %d conversations", guild.id, purged)

    async def _purge_channel(self, channel_id: int) -> None:
        if await self.store.purge_conversation(conversation_key(channel_id)):
            log.info("channel %d was deleted: its history is deleted too", channel_id)

    # ---- buttons -----------------------------------------------------------------------

    def _allowed(self, interaction: discord.Interaction, requester_id: int) -> bool:
        return interaction.user.id == requester_id or interaction_is_admin(
            interaction, self.bot.settings.admin_user_ids
        )

    async def stop(self, interaction: discord.Interaction, requester_id: int) -> None:
        if not self._allowed(interaction, requester_id):
            await interaction.response.send_message(
                "Only the person who asked, or an admin, can stop this reply.", ephemeral=True
            )
            return
        message = interaction.message
        answers = message.reference.message_id if message is not None and message.reference else None
        generation = self.get_answerer().generation_of(message.id, answers) if message is not None else None
        if generation is None:
            await interaction.response.send_message("This reply is already finished.", ephemeral=True)
            return
        generation.cancel()
        await interaction.response.defer()

    async def regenerate(self, interaction: discord.Interaction, requester_id: int) -> None:
        if not self._allowed(interaction, requester_id):
            await interaction.response.send_message(
                "Only the person who asked, or an admin, can regenerate this reply.", ephemeral=True
            )
            return
        message = interaction.message
        key = conversation_key(interaction.channel_id or 0)
        stored = await self.store.reply_by_part(key, str(message.id)) if message else None
        if stored is None or stored.reply_to is None:
            await interaction.response.send_message("I can't find the question of this reply.", ephemeral=True)
            return
        if self.gate.rate is not None and (wait := self.gate.rate.take(interaction.user.id, time.monotonic())):
            await interaction.response.send_message(f"Slow down: try again in {wait:.0f} s.", ephemeral=True)
            return
        if self.get_answerer().is_under_way(stored.id):
            await interaction.response.send_message("This reply is still being written.", ephemeral=True)
            return
        question = Question(key, interaction.channel_id or 0, int(stored.reply_to), requester_id,
                            interaction.user.display_name)
        channel = self.bot.get_partial_messageable(question.channel_id)
        if not self.accepting or not self.lanes.other(key, lambda: self.get_answerer().answer(question, channel, stored)):
            await interaction.response.send_message("Too much is waiting here; try again in a minute.", ephemeral=True)
            return
        await interaction.response.defer()

    # ---- shutting down -----------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Take no new work, end the replies under way within `grace` seconds, each with
        its final state in Discord and in the store."""
        self.accepting = False
        if self._retention is not None:
            self._retention.cancel()
        deadline = time.monotonic() + grace
        if self._arriving:  # Discord delivered them: store them (answered after the restart)
            _, late = await asyncio.wait(set(self._arriving), timeout=grace)
            if late:
                log.warning("%d messages Discord delivered were not stored within the shutdown grace; "
                            "the restart back-fills what it can from Discord", len(late))
        await self.held.close()
        dropped = self.lanes.close()
        under_way = self.answerer.interrupt_all() if self.answerer else 0
        log.info("shutting down: %d replies under way, %d waiting (stored, answered after the restart)",
                 under_way, dropped)
        workers = self.lanes.workers() + self.recovery.stop()
        if workers:
            done, pending = await asyncio.wait(workers, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d replies did not finish within %.0f s; the next start marks them interrupted",
                            len(pending), grace)
                await asyncio.gather(*pending, return_exceptions=True)


async def setup(bot: HermesBot) -> None:
    """The extension's entry point: replies a crash left streaming are marked interrupted
    before the gateway connects, then the cog listens."""
    chat = Chat(bot)
    await chat.recovery.before_connect()
    await bot.add_cog(chat)
