"""Slash commands for running the bot: /reset, /status, /channel enable|disable, and the
admins' /reload-model (hot swap: the old model serves until the new one is ready)."""

from __future__ import annotations

import asyncio
import logging
import time

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.policy import conversation_key
from bot.edge.bot import HermesBot
from bot.edge.convert import interaction_may_manage
from bot.engine.base import ModelLoadError
from bot.engine.model_source import (
    HubFile,
    available_models,
    check_hub_source,
    configured_model,
    download,
    parse_reload_target,
)
from bot.engine.remote import RemoteEngine
from bot.telemetry import metrics

log = logging.getLogger(__name__)


def _server_line(server: dict[str, object]) -> str:
    state = "up" if server["healthy"] else f"**down** {server['down_seconds']} s ({server['error']})"
    return (f"- `{server['url']}` {state}: {server['busy']}/{server['slots']} slots busy, "
            f"{server['conversations']} conversations, {server['tokens_per_second']} tokens/s lately")


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


class Admin(commands.Cog):
    # Members without Manage Channels do not even see /channel; it means nothing in a DM.
    channel = app_commands.Group(
        name="channel", description="Where the bot answers every message",
        default_permissions=discord.Permissions(manage_channels=True), guild_only=True,
    )

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.started = time.monotonic()
        self._reloading = asyncio.Lock()

    @app_commands.command(name="reset", description="Forget this conversation up to now")
    async def reset(self, interaction: discord.Interaction) -> None:
        await self.bot.responder.store.reset(conversation_key(interaction.channel_id or 0))
        await interaction.response.send_message("Done: I have forgotten everything said here before now.")

    @app_commands.command(name="forget", description="Delete your messages here from the bot's memory, for good")
    @app_commands.describe(everything="Manage Channels: delete this conversation's whole history")
    async def forget(self, interaction: discord.Interaction, everything: bool = False) -> None:
        key = conversation_key(interaction.channel_id or 0)
        store = self.bot.responder.store
        if everything:
            if not interaction_may_manage(interaction, self.bot.settings.admin_user_ids):
                await interaction.response.send_message(
                    "Deleting everyone's messages needs the Manage Channels permission; "
                    "`/forget` alone deletes yours.", ephemeral=True
                )
                return
            deleted = await store.forget_conversation(key)
            await interaction.response.send_message(f"Deleted this conversation's history ({deleted} messages).")
            return
        deleted = await store.forget_author(key, str(interaction.user.id), str(interaction.guild_id or ""))
        await interaction.response.send_message(f"Deleted your {deleted} messages here.", ephemeral=True)

    @app_commands.command(name="status", description="The model, its context, the queue and speed")
    async def status(self, interaction: discord.Interaction) -> None:
        engine = self.bot.responder.engine
        stats = engine.last_stats
        speed = f"{stats.tokens_per_second:.1f} tokens/s" if stats and stats.completion_tokens else "no generation yet"
        busy, total = engine.slot_usage()
        lines = [
            f"**Model:** {engine.info.name}",
            f"**Context:** {engine.info.n_ctx} tokens",
            f"**Queue:** {engine.queue_depth} waiting",
            f"**Engine:** {engine.health.describe()}",
            f"**Last generation:** {speed}",
            f"**Slots:** {busy}/{total} busy",
            "**Replies since start:** " + ", ".join(f"{n} {outcome}" for outcome, n in metrics.replies_so_far().items()),
            f"**Uptime:** {_uptime(time.monotonic() - self.started)}",
        ]
        prefixes = getattr(engine, "prefix_stats", None)
        if callable(prefixes) and (kept := prefixes()).stored:
            lines.append(f"**Shared preambles:** {kept.entries} kept ({kept.bytes / 2**20:.0f} MiB), "
                         f"{kept.hits} channel start(s) from them")
        if isinstance(engine, RemoteEngine):
            lines += [_server_line(server) for server in engine.servers()]
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @channel.command(name="enable", description="Answer every message in this channel or thread")
    async def channel_enable(self, interaction: discord.Interaction) -> None:
        await self._set_enabled(interaction, True)

    @channel.command(name="disable", description="Only answer mentions and replies here")
    async def channel_disable(self, interaction: discord.Interaction) -> None:
        await self._set_enabled(interaction, False)

    async def _set_enabled(self, interaction: discord.Interaction, enabled: bool) -> None:
        if not interaction_may_manage(interaction, self.bot.settings.admin_user_ids):
            await interaction.response.send_message(
                "You need the Manage Channels permission (or bot admin rights) for this.", ephemeral=True
            )
            return
        await self.bot.responder.store.set_enabled(conversation_key(interaction.channel_id or 0), enabled)
        await interaction.response.send_message(
            "I will answer every message here." if enabled else "I will only answer mentions and replies here."
        )

    @channel.command(name="speak", description="When I speak to messages that do not address me (no option: show)")
    @app_commands.describe(chance="percent of such messages answered at random (0: none)",
                           follow_up="seconds after I answered someone in which their next message is answered",
                           name="answer messages that say my persona's name")
    async def channel_speak(self, interaction: discord.Interaction, chance: app_commands.Range[int, 0, 100] | None = None,
                            follow_up: app_commands.Range[int, 0, 3600] | None = None, name: bool | None = None) -> None:
        key = conversation_key(interaction.channel_id or 0)
        store = self.bot.responder.store
        state = await store.state(key)
        changing = (chance, follow_up, name) != (None, None, None)
        if changing and not interaction_may_manage(interaction, self.bot.settings.admin_user_ids):
            await interaction.response.send_message(
                "You need the Manage Channels permission (or bot admin rights) for this.", ephemeral=True
            )
            return
        rules = (state.reply_chance if chance is None else chance,
                 state.follow_up_seconds if follow_up is None else follow_up,
                 state.name_trigger if name is None else name)
        if changing:
            await store.set_speaking(key, *rules)
        persona = self.bot.responder.persona(state.persona).name
        await interaction.response.send_message(
            ("Saved. " if changing else "") + f"Besides mentions and replies, I answer here: {rules[0]} % of messages "
            f"at random; for {rules[1]} s after I answered someone, their next message; "
            + (f"messages that say “{persona}”." if rules[2] else "not messages just for saying my name.")
            + (" (Every message is answered here anyway: `/channel enable` is on.)" if state.enabled else ""),
            ephemeral=not changing,
        )

    @channel.command(name="training-export", description="Let this channel's chats become training data (or not)")
    @app_commands.describe(state="on: `hermes-bot export-dataset` includes this channel, pseudonymized")
    @app_commands.choices(state=[app_commands.Choice(name="on", value="on"), app_commands.Choice(name="off", value="off")])
    async def channel_training_export(self, interaction: discord.Interaction, state: app_commands.Choice[str]) -> None:
        if not interaction_may_manage(interaction, self.bot.settings.admin_user_ids):
            await interaction.response.send_message(
                "You need the Manage Channels permission (or bot admin rights) for this.", ephemeral=True
            )
            return
        on = state.value == "on"
        await self.bot.responder.store.set_training_export(conversation_key(interaction.channel_id or 0), on)
        await interaction.response.send_message(
            "This channel's conversations will be part of the training dataset export (names and ids pseudonymized; "
            "deleted and forgotten messages left out)." if on
            else "This channel's conversations are no longer exported as training data."
        )

    @app_commands.command(name="reload-model", description="Bot owners: load another model (or reload this one)")
    @app_commands.describe(model="a .gguf under MODELS_DIR, or owner/repo/file.gguf from the hub")
    @app_commands.default_permissions(administrator=True)  # hidden from ordinary members
    async def reload_model(self, interaction: discord.Interaction, model: str | None = None) -> None:
        from bot.engine.base import ModelUnavailable

        settings = self.bot.settings
        # The model serves every server: a server's Administrator is not enough.
        if not await self.bot.is_bot_owner(interaction.user):
            await interaction.response.send_message(
                "Only the bot's owners (its application owner or team, and ADMIN_USER_IDS) can reload the model.",
                ephemeral=True,
            )
            return
        if self.bot.stopping:
            await interaction.response.send_message("The bot is shutting down; reload after the restart.", ephemeral=True)
            return
        engine = self.bot.responder.engine
        if isinstance(engine, RemoteEngine):
            served = "\n".join(f"- {row['url']}: `{row['model'] or 'unknown'}`" for row in engine.servers())
            await interaction.response.send_message(
                "The model is served by the llama-server fleet (`ENGINE=remote`): change it on the servers "
                f"(restart each with `-m NEW.gguf`); the bot follows. Now serving:\n{served}"[:2000],
                ephemeral=True,
            )
            return
        try:
            target = parse_reload_target(model, settings.models_dir) if model else None
        except ModelLoadError as error:
            await interaction.response.send_message(f"Refused: {error}", ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        if self._reloading.locked():
            await interaction.edit_original_response(content="A reload is already under way; try again after it.")
            return
        async with self._reloading:
            engine = self.bot.responder.engine
            old = engine.info.name
            try:
                if isinstance(target, HubFile):
                    max_bytes = int(settings.max_download_gb * 1e9)
                    await asyncio.to_thread(check_hub_source, target, settings.hub_allowed_repos, max_bytes)
                    await interaction.edit_original_response(content=f"Downloading `{target}` from the hub…")
                    path = await asyncio.to_thread(download, target)
                    if path.stat().st_size > max_bytes:
                        raise ModelLoadError(f"{path.name} is larger than MAX_DOWNLOAD_GB={settings.max_download_gb:g}")
                elif target is None:
                    path = await asyncio.to_thread(configured_model, settings)
                else:
                    path = target
                plan = await engine.plan_reload(str(path))  # refuses at once a file that cannot fit
                if plan.mode == "unload":
                    await interaction.edit_original_response(content=(
                        f"Loading `{path.name}`: it does not fit in memory beside `{old}` ({plan.detail}), "
                        f"so the bot is **offline for the swap**: `{old}` finishes the replies under way and is "
                        "unloaded, then the new model loads. Messages sent meanwhile wait in the queue and are "
                        f"answered afterwards; if `{path.name}` fails to load, `{old}` is loaded back."
                    ))
                else:
                    await interaction.edit_original_response(
                        content=f"Loading `{path.name}`… `{old}` keeps answering meanwhile."
                    )
                info = await engine.reload(str(path))
            except ModelUnavailable as error:
                log.critical("reload-model failed and no model is loaded: %s", error)
                await interaction.edit_original_response(
                    content=f"Could not load the model, nor `{old}` back: {error}\nNo model is loaded now."
                )
                return
            except ModelLoadError as error:
                log.error("reload-model failed: %s", error)
                await interaction.edit_original_response(
                    content=f"Could not load the model: {error}\nStill serving `{old}`."
                )
                return
        log.info("%s reloaded the model: %s → %s", interaction.user, old, info.name)
        await interaction.edit_original_response(
            content=f"Now serving `{info.name}` (context {info.n_ctx} tokens; was `{old}`)."
        )

    @reload_model.autocomplete("model")
    async def _model_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = available_models(self.bot.settings.models_dir)
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Admin(bot))
