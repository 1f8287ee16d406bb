"""/me set|show|clear: who a person plays (a user persona, see `bot.roleplay.user_personas`).

A description is kept per person per server; in a DM, or with `everywhere: True`, it is the
person's default, used in every server where they set none. Anyone may set their own; the
answers are ephemeral (only the person sees them)."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.edge.bot import HermesBot
from bot.roleplay.user_personas import (
    MAX_DESCRIPTION_CHARS,
    DescriptionError,
    check_description,
)

GLOBAL = ""  # the guild id of a person's default description


def _scope(interaction: discord.Interaction, everywhere: bool) -> str:
    return GLOBAL if everywhere or interaction.guild_id is None else str(interaction.guild_id)


def _where(guild_id: str) -> str:
    return "everywhere (your default)" if guild_id == GLOBAL else "in this server"


class Me(commands.Cog):
    me = app_commands.Group(name="me", description="Who you play: the bot's characters address you as that")

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.store = bot.responder.store

    @me.command(name="set", description="Describe who you play ({{user}} is your name, {{char}} the character's)")
    @app_commands.describe(description=f"at most {MAX_DESCRIPTION_CHARS} characters",
                           everywhere="your default in every server (in a DM it always is)")
    async def me_set(self, interaction: discord.Interaction, description: str, everywhere: bool = False) -> None:
        try:
            text = check_description(description)
        except DescriptionError as error:
            await interaction.response.send_message(str(error), ephemeral=True)
            return
        guild_id = _scope(interaction, everywhere)
        await self.store.set_user_persona(str(interaction.user.id), guild_id, text)
        await interaction.response.send_message(f"Saved {_where(guild_id)}: the characters will know you as this.",
                                                ephemeral=True)

    @me.command(name="show", description="Show who you play here")
    async def me_show(self, interaction: discord.Interaction) -> None:
        found = await self.store.user_persona(str(interaction.user.id), _scope(interaction, False))
        if found is None:
            await interaction.response.send_message("You have no description here; `/me set` gives you one.",
                                                    ephemeral=True)
            return
        description, guild_id = found
        await interaction.response.send_message(f"Your description, {_where(guild_id)}:\n>>> {description}",
                                                ephemeral=True)

    @me.command(name="clear", description="Delete your description here (or your default)")
    @app_commands.describe(everywhere="delete your default instead of this server's")
    async def me_clear(self, interaction: discord.Interaction, everywhere: bool = False) -> None:
        guild_id = _scope(interaction, everywhere)
        deleted = await self.store.clear_user_persona(str(interaction.user.id), guild_id)
        await interaction.response.send_message(
            f"Deleted your description {_where(guild_id)}." if deleted else f"You had no description {_where(guild_id)}.",
            ephemeral=True,
        )


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Me(bot))
