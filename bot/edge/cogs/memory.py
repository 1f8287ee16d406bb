"""/memory show|clear (the rolling summary, bot.roleplay.memory) and /note set|show|clear (the
author's note, bot.roleplay.author_note).

/memory show is for anyone who can read the conversation (ephemeral); /memory clear and
the author's note need Manage Channels in a server (or bot admin rights), anyone in their
own DM. The summary is shown as it is stored, without pings."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.policy import conversation_key
from bot.edge.bot import HermesBot
from bot.edge.convert import interaction_may_manage
from bot.roleplay.author_note import (
    DEFAULT_DEPTH,
    DEFAULT_EVERY,
    MAX_DEPTH,
    MAX_EVERY,
    MAX_NOTE_CHARS,
    AuthorNote,
    describe,
)

NEED_MANAGE = "You need the Manage Channels permission (or bot admin rights) for this."
MAX_SHOWN_CHARS = 1900


class Memory(commands.Cog):
    memory = app_commands.Group(name="memory", description="The summary of this conversation's older turns")
    # Configuration: hidden from members without Manage Channels (checked again when used).
    note = app_commands.Group(
        name="note", description="The author's note: text placed near the end of the chat",
        default_permissions=discord.Permissions(manage_channels=True),
    )

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot

    async def cog_unload(self) -> None:
        await self.bot.responder.memory.close()

    @staticmethod
    def _key(interaction: discord.Interaction) -> str:
        return conversation_key(interaction.channel_id or 0)

    def _may_manage(self, interaction: discord.Interaction) -> bool:
        return interaction_may_manage(interaction, self.bot.settings.admin_user_ids)

    @memory.command(name="show", description="Show the summary the bot keeps of the older turns here")
    async def memory_show(self, interaction: discord.Interaction) -> None:
        state, _, _ = await self.bot.responder.store.prompt_extras(self._key(interaction))
        if not state.summary:
            text = ("No summary yet: the conversation still fits the model's context."
                    if self.bot.responder.memory.enabled else "Long memory is off (MEMORY_SUMMARY_WORDS=0).")
        else:
            summary = state.summary if len(state.summary) <= MAX_SHOWN_CHARS else state.summary[:MAX_SHOWN_CHARS] + " […]"
            text = f"**What I remember of the older turns here:**\n>>> {summary}"
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    @memory.command(name="clear", description="Forget the summary of the older turns (rebuilt when needed)")
    async def memory_clear(self, interaction: discord.Interaction) -> None:
        if not self._may_manage(interaction):
            await interaction.response.send_message(NEED_MANAGE, ephemeral=True)
            return
        had = await self.bot.responder.memory.forget(self._key(interaction))
        await interaction.response.send_message(
            "Done: the summary of the older turns is gone." if had else "There was no summary to clear."
        )

    @note.command(name="set", description="Set the author's note for this conversation")
    @app_commands.describe(
        text="The note ({{char}} and {{user}} work); it goes into the chat near its end",
        depth="How many messages from the end (0: after the last one; default 4)",
        every="Every how many of people's messages (1: always, 0: never; default 1)",
    )
    async def note_set(
        self, interaction: discord.Interaction, text: app_commands.Range[str, 1, MAX_NOTE_CHARS],
        depth: app_commands.Range[int, 0, MAX_DEPTH] = DEFAULT_DEPTH,
        every: app_commands.Range[int, 0, MAX_EVERY] = DEFAULT_EVERY,
    ) -> None:
        await self._set_note(interaction, AuthorNote(text.strip(), depth, every))

    @note.command(name="clear", description="Remove the author's note")
    async def note_clear(self, interaction: discord.Interaction) -> None:
        await self._set_note(interaction, AuthorNote())

    @note.command(name="show", description="Show the author's note and its settings")
    async def note_show(self, interaction: discord.Interaction) -> None:
        _, note, _ = await self.bot.responder.store.prompt_extras(self._key(interaction))
        await interaction.response.send_message(describe(note)[:2000], ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    async def _set_note(self, interaction: discord.Interaction, note: AuthorNote) -> None:
        if not self._may_manage(interaction):
            await interaction.response.send_message(NEED_MANAGE, ephemeral=True)
            return
        await self.bot.responder.store.set_author_note(
            self._key(interaction), note, is_dm=interaction.guild is None,
            guild_id=str(interaction.guild_id) if interaction.guild_id else None,
        )
        await interaction.response.send_message(
            describe(note)[:2000] if note.text else "The author's note is removed.",
            allowed_mentions=discord.AllowedMentions.none(),
        )


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Memory(bot))
