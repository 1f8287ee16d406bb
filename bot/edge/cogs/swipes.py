"""Swipes and Continue in Discord: the ◀ ▶ and Continue buttons under a reply, and
`/continue`.

Only the asker or an admin may use them (the rule of Regenerate), and only on the
conversation's latest reply: older replies keep their arrows (the bot does not edit every
earlier reply each time it answers, which could fail or be rate limited and would need
its own recovery), and a click on them is answered, only to the person, that only the
latest reply can be swiped. The check is made against the store at the click, so it holds
across restarts.

Both act in the conversation's lane (`bot.lifecycle.channel_queue`), after whatever is queued there,
so a swipe never interleaves with a reply being written, regenerated or continued. A swipe
stores the alternative as the reply's content (the one in history), then Discord shows it
(`bot.edge.reply_stream.sync_reply`: parts added or removed as needed; if Discord is down, it
is delivered later like any stored reply).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.conversation import STREAMING, StoredReply
from bot.core.policy import conversation_key
from bot.edge.answering import Question
from bot.edge.bot import HermesBot
from bot.edge.convert import interaction_is_admin
from bot.edge.reply_stream import sync_reply

if TYPE_CHECKING:
    from bot.edge.cogs.chat import Chat

log = logging.getLogger(__name__)
ONLY_LATEST = "Only the latest reply here can be {}."
PAST = {"swipe": "swiped", "continue": "continued"}


class Swipes(commands.Cog):
    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.store = bot.responder.store

    def _chat(self) -> Chat:
        from bot.edge.cogs.chat import Chat

        chat = self.bot.get_cog("Chat")
        assert isinstance(chat, Chat)
        return chat

    def _allowed(self, interaction: discord.Interaction, requester_id: int) -> bool:
        return interaction.user.id == requester_id or interaction_is_admin(
            interaction, self.bot.settings.admin_user_ids
        )

    async def _refuse(self, interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(text, ephemeral=True)

    async def _clicked_reply(self, interaction: discord.Interaction, requester_id: int,
                             verb: str) -> StoredReply | None:
        """The reply under the clicked button, if this person may act on it now (else the
        person is told why, and None)."""
        if not self._allowed(interaction, requester_id):
            await self._refuse(interaction, f"Only the person who asked, or an admin, can {verb} this reply.")
            return None
        key = conversation_key(interaction.channel_id or 0)
        message = interaction.message
        stored = await self.store.reply_by_part(key, str(message.id)) if message else None
        if stored is None:
            await self._refuse(interaction, "I can't find this reply any more.")
            return None
        return await self._usable(interaction, stored, verb)

    async def _usable(self, interaction: discord.Interaction, stored: StoredReply, verb: str) -> StoredReply | None:
        latest = await self.store.latest_reply(stored.key)
        if latest is None or latest.id != stored.id:
            await self._refuse(interaction, ONLY_LATEST.format(PAST[verb]))
            return None
        if stored.status == STREAMING or self._chat().is_under_way(stored.id):
            await self._refuse(interaction, "This reply is still being written.")
            return None
        return stored

    # ---- swipes ------------------------------------------------------------------------

    async def swipe(self, interaction: discord.Interaction, requester_id: int, step: int) -> None:
        stored = await self._clicked_reply(interaction, requester_id, "swipe")
        if stored is None:
            return
        chat = self._chat()
        if not chat.accepting or not chat.lanes.other(stored.key, lambda: self._swipe(stored, step)):
            await self._refuse(interaction, "Too much is waiting here; try again in a minute.")
            return
        await interaction.response.defer()

    async def _swipe(self, stored: StoredReply, step: int) -> None:
        latest = await self.store.latest_reply(stored.key)
        if latest is None or latest.id != stored.id:
            return  # a newer reply began while the swipe waited
        swiped = await self.store.swipe_reply(stored.id, step)
        if swiped is None:
            return  # already at that end
        reply, _ = swiped
        to = self._chat().destination_of(reply)  # the channel, or a scene character's webhook
        if to is not None:
            await sync_reply(self.store, reply, to, self.bot.settings.delivery_retry_seconds)

    # ---- continue ----------------------------------------------------------------------

    async def continue_reply(self, interaction: discord.Interaction, requester_id: int) -> None:
        """The Continue button."""
        stored = await self._clicked_reply(interaction, requester_id, "continue")
        if stored is not None and await self._queue_continue(interaction, stored, requester_id):
            await interaction.response.defer()

    @app_commands.command(name="continue", description="Have the bot write on after its last reply here")
    async def continue_command(self, interaction: discord.Interaction) -> None:
        latest = await self.store.latest_reply(conversation_key(interaction.channel_id or 0))
        if latest is None:
            await self._refuse(interaction, "There is no reply here to continue.")
            return
        requester_id = int(latest.requester_id) if (latest.requester_id or "").isdigit() else 0
        if not self._allowed(interaction, requester_id):
            await self._refuse(interaction, "Only the person who asked, or an admin, can continue the last reply.")
            return
        stored = await self._usable(interaction, latest, "continue")
        if stored is not None and await self._queue_continue(interaction, stored, requester_id):
            await interaction.response.send_message("Continuing the last reply.", ephemeral=True)

    async def _queue_continue(self, interaction: discord.Interaction, stored: StoredReply, requester_id: int) -> bool:
        """Queue the continuation in the conversation's lane; False (the person told) when
        it cannot be."""
        if not stored.content.strip():
            await self._refuse(interaction, "This reply has no text to continue; press Regenerate.")
            return False
        chat = self._chat()
        if chat.gate.rate is not None and (wait := chat.gate.rate.take(interaction.user.id, time.monotonic())):
            await self._refuse(interaction, f"Slow down: try again in {wait:.0f} s.")
            return False
        question = Question(stored.key, interaction.channel_id or 0, int(stored.reply_to) if stored.reply_to else None,
                            requester_id, interaction.user.display_name)
        channel = self.bot.get_partial_messageable(question.channel_id)
        if not chat.accepting or not chat.lanes.other(stored.key, lambda: self._continue(question, channel, stored)):
            await self._refuse(interaction, "Too much is waiting here; try again in a minute.")
            return False
        return True

    async def _continue(self, question: Question, channel: discord.abc.Messageable, stored: StoredReply) -> None:
        latest = await self.store.latest_reply(stored.key)
        if latest is None or latest.id != stored.id or not latest.content.strip() or latest.status == STREAMING:
            log.info("%s: the reply to continue changed while the continuation waited; not continuing", stored.key)
            return
        await self._chat().get_answerer().answer(question, channel, latest, continuing=True)


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Swipes(bot))
