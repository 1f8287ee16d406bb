"""Slash commands to choose the conversation's roleplay persona: /persona list|set|show|clear."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.edge import interaction_may_manage
from bot.policy import conversation_key
from bot.replies import split_message

if TYPE_CHECKING:
    from bot.app import HermesBot

NO_PINGS = discord.AllowedMentions.none()


class Personas(commands.Cog):
    persona = app_commands.Group(name="persona", description="Who the bot plays in this conversation")

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot

    @persona.command(name="list", description="The personas you can choose")
    async def list_personas(self, interaction: discord.Interaction) -> None:
        lines = [
            f"`{key}` — {p.name}" + (" (roleplay)" if p.roleplay else "")
            for key, p in sorted(self.bot.responder.personas.items())
        ]
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @persona.command(name="show", description="The persona of this conversation")
    async def show(self, interaction: discord.Interaction) -> None:
        persona = await self.bot.responder.conversation_persona(conversation_key(interaction.channel_id or 0))
        about = persona.description or persona.system_prompt or "the plain assistant"
        await interaction.response.send_message(f"**{persona.name}**: {about[:1800]}", ephemeral=True)

    @persona.command(name="set", description="Choose the persona for this conversation")
    @app_commands.describe(name="a persona from /persona list")
    async def set_persona(self, interaction: discord.Interaction, name: str) -> None:
        responder = self.bot.responder
        if not interaction_may_manage(interaction, self.bot.settings.admin_user_ids):
            await interaction.response.send_message(
                "You need the Manage Channels permission (or bot admin rights) to change the persona.",
                ephemeral=True,
            )
            return
        wanted = name.strip().lower()
        key = next((k for k, p in responder.personas.items() if wanted in (k, p.name.lower())), None)
        if key is None:
            await interaction.response.send_message(
                f"There is no persona called {name!r}; see /persona list.", ephemeral=True
            )
            return
        conversation = conversation_key(interaction.channel_id or 0)
        await responder.store.set_persona(conversation, key)
        persona = responder.personas[key]
        greeting = persona.greeting(user=interaction.user.display_name)
        text = f"*{persona.name} joins the conversation.*"
        if greeting:
            text = split_message(greeting)[0]
        await interaction.response.send_message(text, allowed_mentions=NO_PINGS)
        if greeting:
            sent = await interaction.original_response()
            await responder.save_reply(conversation, persona, text, bot_id=str(sent.author.id), platform_id=str(sent.id))

    @set_persona.autocomplete("name")
    async def _names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [
            app_commands.Choice(name=f"{p.name} ({key})"[:100], value=key)
            for key, p in sorted(self.bot.responder.personas.items())
            if current.lower() in key or current.lower() in p.name.lower()
        ][:25]

    @persona.command(name="clear", description="Back to the plain assistant")
    async def clear(self, interaction: discord.Interaction) -> None:
        if not interaction_may_manage(interaction, self.bot.settings.admin_user_ids):
            await interaction.response.send_message(
                "You need the Manage Channels permission (or bot admin rights) to change the persona.",
                ephemeral=True,
            )
            return
        await self.bot.responder.store.set_persona(conversation_key(interaction.channel_id or 0), None)
        await interaction.response.send_message("Back to the plain assistant.")
