"""Slash commands for the conversation's roleplay persona: /persona list|show|set|clear and
/persona import (a SillyTavern character card, PNG or JSON, as a Discord attachment)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.policy import conversation_key
from bot.core.replies import split_message
from bot.edge.bot import HermesBot
from bot.edge.convert import interaction_may_manage
from bot.roleplay.cards import MAX_CARD_BYTES
from bot.roleplay.personas import (
    parse_card_off_loop,
    persona_key,
    scoped_key,
    short_key,
)

log = logging.getLogger(__name__)
NO_PINGS = discord.AllowedMentions.none()
PERSONA_QUOTA = 25  # imported personas per server (or per person, in DMs)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # a PNG card's image becomes its avatar in scenes
NEEDS_MANAGE = "You need the Manage Channels permission (or bot admin rights) for this."


class Personas(commands.Cog):
    persona = app_commands.Group(name="persona", description="Who the bot plays in this conversation")

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.responder = bot.responder

    def _may_manage(self, interaction: discord.Interaction) -> bool:
        return interaction_may_manage(interaction, self.bot.settings.admin_user_ids)

    @staticmethod
    def _scope(interaction: discord.Interaction) -> str:
        """Cards imported in a server belong to that server; in a DM, to that person."""
        return f"g{interaction.guild_id}" if interaction.guild_id else f"u{interaction.user.id}"

    @persona.command(name="list", description="The personas you can choose")
    async def list_personas(self, interaction: discord.Interaction) -> None:
        lines = [
            f"`{short_key(key)}` — {p.name}" + (" (roleplay)" if p.roleplay else "")
            + (" (imported here)" if p.source == "imported" else "")
            for key, p in sorted(self.responder.visible_personas(self._scope(interaction)).items())
        ]
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @persona.command(name="show", description="The persona of this conversation")
    async def show(self, interaction: discord.Interaction) -> None:
        persona = await self.responder.conversation_persona(conversation_key(interaction.channel_id or 0))
        about = persona.description or persona.system_prompt or "the plain assistant"
        await interaction.response.send_message(f"**{persona.name}**: {about}"[:2000], ephemeral=True)

    @persona.command(name="set", description="Choose the persona for this conversation")
    @app_commands.describe(
        name="a persona from /persona list",
        greeting="which greeting to post: 0 = the main one, 1, 2… = the alternates",
        random_greeting="post one of the greetings at random",
    )
    async def set_persona(
        self, interaction: discord.Interaction, name: str, greeting: int = 0, random_greeting: bool = False
    ) -> None:
        if not self._may_manage(interaction):
            await interaction.response.send_message(NEEDS_MANAGE, ephemeral=True)
            return
        key = self.responder.find_persona(name, self._scope(interaction))
        if key is None:
            await interaction.response.send_message(f"There is no persona called {name!r}; see /persona list.", ephemeral=True)
            return
        conversation = conversation_key(interaction.channel_id or 0)
        await self.responder.store.set_persona(conversation, key)
        persona = self.responder.personas[key]
        text = persona.greeting(interaction.user.display_name, greeting, random.Random() if random_greeting else None)
        parts = split_message(text)
        if not parts:
            await interaction.response.send_message(f"*{persona.name} joins the conversation.*")
            return
        # A greeting of any length is posted whole: the first part answers the command, the
        # rest follow it. History keeps it once, unsplit, under the first part's id.
        answered = await interaction.response.send_message(parts[0], allowed_mentions=NO_PINGS)
        # Discord's answer to the callback carries the message: no second request (a fetch
        # could fail after the greeting is shown, and the greeting would not be stored).
        sent = answered.resource if isinstance(answered.resource, discord.InteractionMessage) \
            else await interaction.original_response()
        await self.responder.save_reply(conversation, persona, text.strip(), bot_id=str(sent.author.id),
                                        platform_id=str(sent.id))
        for part in parts[1:]:
            await interaction.followup.send(part, allowed_mentions=NO_PINGS, wait=True)

    @set_persona.autocomplete("name")
    async def _names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [
            app_commands.Choice(name=f"{p.name} ({short_key(key)})"[:100], value=short_key(key))
            for key, p in sorted(self.responder.visible_personas(self._scope(interaction)).items())
            if current.lower() in key or current.lower() in p.name.lower()
        ][:25]

    @persona.command(name="clear", description="Back to the plain assistant")
    async def clear(self, interaction: discord.Interaction) -> None:
        if not self._may_manage(interaction):
            await interaction.response.send_message(NEEDS_MANAGE, ephemeral=True)
            return
        await self.responder.store.set_persona(conversation_key(interaction.channel_id or 0), None)
        await interaction.response.send_message("Back to the plain assistant.")

    @persona.command(name="import", description="Import a character card (PNG or JSON, SillyTavern V1/V2/V3)")
    @app_commands.describe(card="the character card file")
    async def import_card(self, interaction: discord.Interaction, card: discord.Attachment) -> None:
        if not self._may_manage(interaction):
            await interaction.response.send_message(NEEDS_MANAGE, ephemeral=True)
            return
        if card.size > MAX_CARD_BYTES:
            await interaction.response.send_message(
                f"That file is {card.size} bytes; cards may be at most {MAX_CARD_BYTES}.", ephemeral=True
            )
            return
        limit = None if await self.bot.is_bot_owner(interaction.user) else self.bot.import_limit
        now = time.monotonic()
        if limit is not None and (wait := limit.take(interaction.user.id, now)):
            await interaction.response.send_message(
                f"Slow down: you have imported {limit.count} cards in the last {limit.window / 60:.0f} minutes; "
                f"you can import again in {wait:.0f} s.", ephemeral=True
            )
            return
        imported = False
        try:
            imported = await self._import(interaction, card)
        finally:
            if limit is not None and not imported:
                limit.refund(interaction.user.id, now)  # a refused card does not count

    async def _import(self, interaction: discord.Interaction, card: discord.Attachment) -> bool:
        """Parse, check and store one card; True once it is imported (False: refused, told why)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            data = await card.read()
            # Parsed in a worker thread within a time limit: a hostile card never blocks the
            # event loop, and one that takes too long is refused (PersonaError).
            raw, persona = await parse_card_off_loop(data, card.filename)
        except (ValueError, discord.HTTPException) as error:  # CardError and PersonaError are ValueErrors
            log.info("rejected card %s from %s: %s", card.filename, interaction.user, error)
            reason = str(error).removeprefix(f"{card.filename}: ")
            await interaction.followup.send(f"I can't import {card.filename}: {reason}"[:2000], ephemeral=True)
            return False
        scope = self._scope(interaction)
        key = scoped_key(scope, persona.name)
        if persona_key(persona.name) in self.responder.personas:
            await interaction.followup.send(
                f"`{persona_key(persona.name)}` is a persona shipped with the bot (read-only); "
                "rename the character to import it.", ephemeral=True
            )
            return False
        owned = sum(k.startswith(f"{scope}/") for k in self.responder.personas)
        if key not in self.responder.personas and owned >= PERSONA_QUOTA:
            await interaction.followup.send(
                f"This {'server' if interaction.guild_id else 'DM'} already has {owned} imported personas, "
                f"the most it may keep ({PERSONA_QUOTA}).", ephemeral=True
            )
            return False
        await self.responder.store.save_imported_persona(key, raw, card.filename, str(interaction.user.id),
                                                         avatar=data if data.startswith(PNG_SIGNATURE) else None)
        self.responder.personas[key] = replace(persona, source="imported")
        greetings = len(persona.greetings)
        lore = len(persona.lorebook.entries) if persona.lorebook else 0
        skipped = persona.lorebook.skipped if persona.lorebook else ()
        note = f"\nSkipped {len(skipped)} lorebook problem(s): " + "; ".join(skipped) if skipped else ""
        await interaction.followup.send(
            (f"Imported **{persona.name}** as `{short_key(key)}` for this "
             f"{'server' if interaction.guild_id else 'DM'} ({greetings} greeting(s), {lore} lorebook entries). "
             f"Use `/persona set {short_key(key)}`." + note)[:2000],
            ephemeral=True,
        )
        return True


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Personas(bot))
