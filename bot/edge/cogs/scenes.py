"""/scene add|remove|list|strategy: several characters in one channel (Manage Channels,
servers only). Each character posts through its own webhook (`bot.edge.webhooks`); who answers
a message is `bot.roleplay.scenes`' rule. Adding a character also makes the bot answer every message
of the channel, as in a group chat."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.policy import conversation_key
from bot.edge.bot import HermesBot
from bot.edge.convert import interaction_may_manage
from bot.edge.webhooks import NoWebhookPermission, missing_permission_notice
from bot.roleplay.personas import short_key
from bot.roleplay.scenes import DEFAULT_STRATEGY, MAX_MEMBERS

if TYPE_CHECKING:
    from bot.edge.webhooks import WebhookDirectory

log = logging.getLogger(__name__)
NEEDS_MANAGE = "You need the Manage Channels permission (or bot admin rights) for this."
STRATEGY_HELP = {
    "natural": "whoever spoke least recently",
    "list": "each in turn, in the listed order",
    "random": "anyone, at random",
}


class Scenes(commands.Cog):
    # Members without Manage Channels do not see /scene; it means nothing in a DM.
    scene = app_commands.Group(
        name="scene", description="Several characters in this channel, each with its own name and avatar",
        default_permissions=discord.Permissions(manage_channels=True), guild_only=True,
    )

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.responder = bot.responder
        self.store = bot.responder.store

    def _webhooks(self) -> WebhookDirectory:
        from bot.edge.cogs.chat import Chat

        chat = self.bot.get_cog("Chat")
        assert isinstance(chat, Chat)
        return chat.webhooks

    async def _allowed(self, interaction: discord.Interaction) -> bool:
        if interaction_may_manage(interaction, self.bot.settings.admin_user_ids) and interaction.guild_id:
            return True
        await interaction.response.send_message(NEEDS_MANAGE, ephemeral=True)
        return False

    def _describe(self, keys: list[str], strategy: str | None) -> str:
        names = [self.responder.persona(k).name if k in self.responder.personas else f"{short_key(k)} (gone)"
                 for k in keys]
        strategy = strategy or DEFAULT_STRATEGY
        if not names:
            return "No scene here: `/scene add` a character."
        return (f"In this scene: {', '.join(f'**{n}**' for n in names)}. A message that names characters is "
                f"answered by them (at most 3); otherwise `{strategy}` picks: {STRATEGY_HELP[strategy]}.")

    @scene.command(name="add", description="Add a character to this channel's scene")
    @app_commands.describe(persona="a persona from /persona list")
    async def add(self, interaction: discord.Interaction, persona: str) -> None:
        if not await self._allowed(interaction):
            return
        persona_key = self.responder.find_persona(persona, f"g{interaction.guild_id}")
        if persona_key is None:
            await interaction.response.send_message(f"There is no persona called {persona!r}; see /persona list.",
                                                    ephemeral=True)
            return
        key = conversation_key(interaction.channel_id or 0)
        character = self.responder.personas[persona_key]
        members, strategy = await self.store.scene(key)
        same_name = [k for k in members if k != persona_key and k in self.responder.personas
                     and self.responder.personas[k].name.lower() == character.name.lower()]
        if same_name:
            await interaction.response.send_message(
                f"A character called {character.name} is in this scene already.", ephemeral=True)
            return
        await interaction.response.defer()  # making the webhook may take longer than Discord waits
        if not await self.store.add_scene_member(key, persona_key, str(interaction.guild_id), MAX_MEMBERS):
            text = (f"**{character.name}** is in this scene already." if persona_key in members
                    else f"This scene has {len(members)} characters, the most it may have ({MAX_MEMBERS}).")
            await interaction.followup.send(text, ephemeral=True)
            return
        await self.store.set_enabled(key, True)
        text = f"**{character.name}** joins the scene; I answer every message here now.\n"
        try:
            await self._webhooks().webhook(interaction.channel_id or 0, persona_key, character.name)
        except NoWebhookPermission:
            text += missing_permission_notice(interaction.channel_id or 0) + "\n"
        except (discord.HTTPException, OSError) as error:  # made later, when the character first speaks
            log.warning("could not make the webhook of %s yet: %s", character.name, error)
        members.append(persona_key)
        await interaction.followup.send((text + self._describe(members, strategy))[:2000])

    @scene.command(name="remove", description="Take a character out of this channel's scene")
    @app_commands.describe(persona="a character of this scene")
    async def remove(self, interaction: discord.Interaction, persona: str) -> None:
        if not await self._allowed(interaction):
            return
        key = conversation_key(interaction.channel_id or 0)
        members, strategy = await self.store.scene(key)
        wanted = persona.strip().lower()
        persona_key = next((k for k in members if wanted in (k, short_key(k))
                            or (k in self.responder.personas and self.responder.personas[k].name.lower() == wanted)),
                           None)
        if persona_key is None or not await self.store.remove_scene_member(key, persona_key):
            await interaction.response.send_message(f"{persona!r} is not in this scene.", ephemeral=True)
            return
        members.remove(persona_key)
        name = self.responder.persona(persona_key).name
        await interaction.response.send_message(f"**{name}** leaves the scene. " + self._describe(members, strategy))

    @scene.command(name="list", description="The characters of this channel's scene")
    async def list_scene(self, interaction: discord.Interaction) -> None:
        members, strategy = await self.store.scene(conversation_key(interaction.channel_id or 0))
        await interaction.response.send_message(self._describe(members, strategy)[:2000], ephemeral=True)

    @scene.command(name="strategy", description="Who answers when a message names no character")
    @app_commands.describe(strategy="natural: least recently spoken; list: in turn; random: anyone")
    async def strategy(self, interaction: discord.Interaction,
                       strategy: Literal["natural", "list", "random"]) -> None:
        if not await self._allowed(interaction):
            return
        key = conversation_key(interaction.channel_id or 0)
        await self.store.set_scene_strategy(key, strategy, str(interaction.guild_id))
        members, _ = await self.store.scene(key)
        await interaction.response.send_message(f"Strategy: `{strategy}`. " + self._describe(members, strategy))

    @add.autocomplete("persona")
    async def _personas(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [
            app_commands.Choice(name=f"{p.name} ({short_key(key)})"[:100], value=short_key(key))
            for key, p in sorted(self.responder.visible_personas(f"g{interaction.guild_id}").items())
            if current.lower() in key or current.lower() in p.name.lower()
        ][:25]

    @remove.autocomplete("persona")
    async def _members(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        members, _ = await self.store.scene(conversation_key(interaction.channel_id or 0))
        return [
            app_commands.Choice(name=self.responder.persona(key).name[:100], value=short_key(key))
            for key in members if current.lower() in key or current.lower() in self.responder.persona(key).name.lower()
        ][:25]


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Scenes(bot))
