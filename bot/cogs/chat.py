"""Chat: Discord messages in, streamed replies out.

`on_message` converts the message at the edge, stores it, asks the policy whether to
answer, and streams the answer: a typing indicator while queued, a reply that references
the question, edits at most once per second per channel, further messages past 2000
characters, Stop / Regenerate buttons, and no pings whatever the model writes.
Edits and deletions in Discord update the stored history.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.cogs.edge import interaction_is_admin, to_incoming, to_message
from bot.engine.base import EngineError, Generation
from bot.personas import Persona
from bot.policy import conversation_key, should_reply, should_store
from bot.prompt import PromptTooLong
from bot.replies import EMPTY_REPLY, EditThrottle, queue_notice, split_message

if TYPE_CHECKING:
    from bot.app import HermesBot

log = logging.getLogger(__name__)
NO_PINGS = discord.AllowedMentions.none()
QUEUE_REFRESH_SECONDS = 2.0  # how often a queued reply's place in the queue is refreshed
REMEMBERED_REPLIES = 1000  # multi-message replies whose parts Regenerate can replace


class StopButton(discord.ui.DynamicItem[discord.ui.Button], template=r"hermes:stop:(?P<user>\d+)"):
    """Ends the generation under way; what was written stays."""

    def __init__(self, requester_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Stop", style=discord.ButtonStyle.danger, custom_id=f"hermes:stop:{requester_id}"
            )
        )
        self.requester_id = requester_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> StopButton:
        return cls(int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _chat_cog(interaction).stop(interaction, self.requester_id)


class RegenerateButton(discord.ui.DynamicItem[discord.ui.Button], template=r"hermes:regen:(?P<user>\d+)"):
    """Replaces the reply with a new one."""

    def __init__(self, requester_id: int, disabled: bool = False) -> None:
        super().__init__(
            discord.ui.Button(
                label="Regenerate",
                style=discord.ButtonStyle.secondary,
                custom_id=f"hermes:regen:{requester_id}",
                disabled=disabled,
            )
        )
        self.requester_id = requester_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> RegenerateButton:
        return cls(int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _chat_cog(interaction).regenerate(interaction, self.requester_id)


def _chat_cog(interaction: discord.Interaction) -> Chat:
    cog = interaction.client.get_cog("Chat")  # type: ignore[attr-defined]
    assert isinstance(cog, Chat)
    return cog


def controls(requester_id: int, running: bool) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    if running:
        view.add_item(StopButton(requester_id))
    view.add_item(RegenerateButton(requester_id, disabled=running))
    return view


class Chat(commands.Cog):
    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.responder = bot.responder
        self.store = bot.responder.store
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._throttles: collections.defaultdict[int, EditThrottle] = collections.defaultdict(
            lambda: EditThrottle(bot.edit_interval)
        )
        self._active: dict[int, Generation] = {}  # first reply message id → generation
        # first reply message id → all its message ids, for Regenerate (the newest replies)
        self._parts: collections.OrderedDict[int, list[int]] = collections.OrderedDict()

    # ---- listening ---------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None or message.author.id == me.id:
            return
        key = conversation_key(message.channel.id)
        state = await self.store.state(key)
        incoming = to_incoming(message, me, state.enabled, state.known)
        reply_to_bots = self.bot.settings.reply_to_bots
        if should_store(incoming, reply_to_bots):
            await self.store.add_message(key, to_message(message))
        if should_reply(incoming, reply_to_bots):
            await self.answer(message, key)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if "content" not in payload.data or (self.bot.user and payload.message.author.id == self.bot.user.id):
            return  # our own streaming edits are stored once, when the reply is complete
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

    # ---- answering ---------------------------------------------------------------------

    async def answer(
        self, question: discord.Message, key: str, previous: list[discord.PartialMessage] | None = None
    ) -> None:
        """Generate and stream the answer to `question`; with `previous`, replace that reply."""
        async with self._locks[key], question.channel.typing():
            try:
                reply = await self.responder.start_reply(key, speaker=question.author.display_name)
            except (EngineError, PromptTooLong) as error:
                log.warning("cannot answer in %s: %s", key, error)
                await question.reply(f"*(I can't answer right now: {error})*", allowed_mentions=NO_PINGS)
                return
            await self._stream(question, key, reply.generation, reply.persona, previous or [])

    async def _stream(
        self,
        question: discord.Message,
        key: str,
        generation: Generation,
        persona: Persona,
        previous: list[discord.PartialMessage],
    ) -> None:
        requester = question.author.id
        sent: list[discord.Message | discord.PartialMessage] = list(previous)
        shown: list[str | None] = [None] * len(sent)
        throttle = self._throttles[question.channel.id]
        loop = asyncio.get_running_loop()

        async def show(parts: list[str], view: discord.ui.View) -> None:
            """Make Discord show `parts`: edit what changed, send what is new."""
            for index, part in enumerate(parts):
                if index < len(sent):
                    if shown[index] != part:
                        extra: dict[str, Any] = {"view": view} if index == 0 else {}
                        await sent[index].edit(content=part, allowed_mentions=NO_PINGS, **extra)
                        shown[index] = part
                    continue
                if index == 0:
                    message = await question.reply(part, mention_author=False, allowed_mentions=NO_PINGS, view=view)
                    self._active[message.id] = generation
                else:
                    message = await question.channel.send(part, allowed_mentions=NO_PINGS)
                sent.append(message)
                shown.append(part)
            throttle.mark(loop.time())

        async def follow_queue(position: int) -> None:
            """While the reply waits, keep its place in the queue up to date."""
            while True:
                await asyncio.sleep(QUEUE_REFRESH_SECONDS)
                if 0 < generation.position != position:
                    position = generation.position
                    await show([queue_notice(position)], controls(requester, running=True))

        if sent:
            self._active[sent[0].id] = generation
        watcher: asyncio.Task[None] | None = None
        if generation.position > 0:
            await show([queue_notice(generation.position)], controls(requester, running=True))
            watcher = asyncio.create_task(follow_queue(generation.position))

        text = ""
        try:
            async for piece in generation:
                if watcher is not None:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
                    watcher = None
                text += piece
                if text.strip() and throttle.ready(loop.time()):
                    await show(split_message(text), controls(requester, running=True))
        except EngineError as error:
            log.error("generation failed in %s: %s", key, error)
            text += f"\n\n*(generation failed: {error})*"
        finally:
            if watcher is not None:
                watcher.cancel()
            if sent:
                self._active.pop(sent[0].id, None)

        parts = split_message(text) or [EMPTY_REPLY]
        await asyncio.sleep(throttle.wait_time(loop.time()))
        if shown:
            shown[0] = None  # the final edit of the first message swaps its buttons
        await show(parts, controls(requester, running=False))
        for extra in sent[len(parts):]:  # a regenerated reply may be shorter than the old one
            await extra.delete()
            await self.store.delete_message(key, str(extra.id))
        del sent[len(parts):]
        self._parts[sent[0].id] = [m.id for m in sent]
        while len(self._parts) > REMEMBERED_REPLIES:
            self._parts.popitem(last=False)
        me = self.bot.user
        for message, part in zip(sent, parts, strict=True):
            await self.responder.save_reply(key, persona, part, bot_id=str(me.id if me else 0), platform_id=str(message.id))

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
        generation = self._active.get(interaction.message.id) if interaction.message else None
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
        reply = interaction.message
        if reply is None or reply.reference is None or reply.reference.message_id is None:
            await interaction.response.send_message("I can't find the question of this reply.", ephemeral=True)
            return
        if reply.id in self._active:
            await interaction.response.send_message("This reply is still being written.", ephemeral=True)
            return
        await interaction.response.defer()
        channel = reply.channel
        question = reply.reference.resolved
        if not isinstance(question, discord.Message):
            question = await channel.fetch_message(reply.reference.message_id)
        key = conversation_key(channel.id)
        part_ids = self._parts.get(reply.id, [reply.id])
        for part_id in part_ids:  # the old reply must not be in the new prompt
            await self.store.delete_message(key, str(part_id))
        previous = [channel.get_partial_message(part_id) for part_id in part_ids]  # type: ignore[union-attr]
        await self.answer(question, key, previous=previous)
