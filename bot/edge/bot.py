"""The Discord bot: `create_bot` wires settings and the chat pipeline into a discord.py bot,
which loads its cogs as extensions (`EXTENSIONS`) and the reply buttons; `shutdown` ends it
gracefully: no new work, the replies under way end with their final state in Discord and in
the store. (`bot.service` runs it from settings, as `python -m bot` does.)

With SHARD_COUNT the bot is a `ShardedHermesBot` (discord.py's AutoShardedBot) running the
shards SHARD_IDS names (all by default); see `bot.edge.sharding` for how several processes
share one database."""

from __future__ import annotations

import logging
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.core.fair_use import RateLimit
from bot.core.settings import Settings
from bot.edge.buttons import ContinueButton, RegenerateButton, StopButton, SwipeButton
from bot.lifecycle.responder import Responder

log = logging.getLogger(__name__)
# The Chat cog first: its recovery marks interrupted replies before the gateway connects.
EXTENSIONS = tuple(f"bot.edge.cogs.{name}" for name in ("chat", "admin", "personas", "scenes", "me", "memory", "swipes"))
IMPORT_WINDOW_SECONDS = 600.0  # CARD_IMPORTS_PER_10_MINUTES counts imports in this window


def point_discord_at(api_base: str, gateway_url: str) -> None:
    """Send discord.py's REST calls and gateway connection to a Discord-compatible server."""
    discord.http.Route.BASE = api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class HermesBot(commands.Bot):
    def __init__(self, settings: Settings, responder: Responder, edit_interval: float = 1.0, **options: Any) -> None:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: switch it on in the Developer Portal
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            **options,
        )
        self.settings = settings
        self.responder = responder
        self.edit_interval = edit_interval
        self.stopping = False  # set by shutdown(): no new work
        # Per person, for strangers: parsing a card costs memory and time. (Reloads need no
        # limit: only the bot's owners may reload, one reload at a time.)
        per_10_min = settings.card_imports_per_10_minutes
        self.import_limit = RateLimit(per_10_min, IMPORT_WINDOW_SECONDS) if per_10_min else None
        self.tree.on_error = self._on_command_error
        self.tree.interaction_check = self._allowed_interaction  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:  # each module's setup(bot) adds its cog
            await self.load_extension(extension)
        self.add_dynamic_items(StopButton, RegenerateButton, SwipeButton, ContinueButton)
        synced = await self.tree.sync()
        log.info("registered %d slash commands", len(synced))

    async def is_bot_owner(self, user: discord.abc.User) -> bool:
        """The bot's owners govern the bot (the model, for every server): the ids in
        ADMIN_USER_IDS and the application's owner or team members, as Discord reports them."""
        return user.id in self.settings.admin_user_ids or await self.is_owner(user)

    async def shutdown(self) -> None:
        """End gracefully: replies under way reach their final state (within
        SHUTDOWN_GRACE_SECONDS), then the connection to Discord closes."""
        self.stopping = True
        chat = self.get_cog("Chat")
        if chat is not None:
            await chat.shutdown(self.settings.shutdown_grace_seconds)  # type: ignore[attr-defined]
        await self.close()

    async def on_message(self, message: discord.Message) -> None:
        """No prefix commands: messages are the Chat cog's; commands are slash commands."""

    async def on_ready(self) -> None:
        log.info("connected as %s, serving %s", self.user, self.responder.engine.info.name)
        for guild in list(self.guilds):
            await self._leave_if_not_allowed(guild)

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self._leave_if_not_allowed(guild)

    def allowed_guild(self, guild_id: int | None) -> bool:
        """DMs, and any server unless ALLOWED_GUILD_IDS names the allowed ones."""
        allowed = self.settings.allowed_guild_ids
        return guild_id is None or not allowed or guild_id in allowed

    async def _leave_if_not_allowed(self, guild: discord.Guild) -> None:
        if not self.allowed_guild(guild.id):
            log.warning("leaving server %s (%d): not in ALLOWED_GUILD_IDS", guild.name, guild.id)
            try:
                await guild.leave()
            except discord.HTTPException as error:
                log.error("could not leave server %d: %s", guild.id, error)

    async def _allowed_interaction(self, interaction: discord.Interaction) -> bool:
        """Every slash command passes here first; refused ones are answered (discord.py
        would otherwise leave the interaction to fail)."""
        if self.allowed_guild(interaction.guild_id):
            return True
        await interaction.response.send_message("You can't use this command here.", ephemeral=True)
        return False

    async def _on_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        if isinstance(error, app_commands.CheckFailure):
            message = "You can't use this command here."
        else:
            log.error("/%s failed", interaction.command.qualified_name if interaction.command else "?", exc_info=error)
            message = "Something went wrong with that command; the error is in the bot's log."
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True)
        else:
            await interaction.response.send_message(message, ephemeral=True)


class ShardedHermesBot(HermesBot, commands.AutoShardedBot):
    """The same bot over several gateway connections, one per shard (SHARD_COUNT, SHARD_IDS).

    With a shard count given, discord.py connects to the configured gateway URL directly
    (it asks /gateway/bot only when it has to choose the count itself)."""

    async def on_ready(self) -> None:
        log.info("running shards %s of %s", ",".join(map(str, self.shard_ids or range(self.shard_count or 1))),
                 self.shard_count)
        await super().on_ready()


def create_bot(settings: Settings, responder: Responder, **options: Any) -> HermesBot:
    """The bot, pointed at the Discord API the settings name. Tests and tools build it here.
    Sharded (a `ShardedHermesBot`) when SHARD_COUNT is set."""
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    if settings.shard_count is None:
        return HermesBot(settings, responder, **options)
    options.setdefault("shard_count", settings.shard_count)
    if settings.shard_ids:
        options.setdefault("shard_ids", sorted(settings.shard_ids))
    return ShardedHermesBot(settings, responder, **options)
