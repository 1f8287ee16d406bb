"""Scene characters speak through channel webhooks: one per character per channel, named
after the character, with its card's image as the avatar (an imported PNG card), found or
created on first use and kept in memory; made again when someone deleted it.

`WebhookPoster` is the `bot.edge.reply_stream.Poster` of a character's replies, so they take the
same lose-nothing path as every reply (stored as they are shown, retried, redelivered).
Without the Manage Webhooks permission the bot says in the channel what to grant (at most
every `NOTICE_EVERY_SECONDS`) and the characters speak through the bot's own messages
meanwhile. `owns` tells the bot's webhook posts from everyone else's: they are its own
history, never answered or stored as another bot's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord.utils import MISSING

from bot.edge.delivery import is_transient, retried
from bot.edge.reply_stream import NO_PINGS, ChannelPoster, PartFrozen

log = logging.getLogger(__name__)
NOTICE_EVERY_SECONDS = 600.0  # how often a channel is told the permission is missing
DENIED_RECHECK_SECONDS = 60.0  # how long a refusal is believed before asking Discord again
MAX_NAME_CHARS = 80  # Discord's limit for webhook names and usernames
_FORBIDDEN_WORDS = re.compile("discord|clyde", re.IGNORECASE)  # Discord refuses these in webhook names
UNKNOWN_WEBHOOK = 10015


def missing_permission_notice(channel_id: int) -> str:
    return (f"*(To speak as each character I need the **Manage Webhooks** permission: give me Manage Webhooks "
            f"in <#{channel_id}>. Until then the characters speak through my own messages.)*")


def refused_notice(channel_id: int, reason: str) -> str:
    return (f"*(Discord refused me a webhook in <#{channel_id}> ({reason[:200]}): free one in the channel's "
            f"Integrations settings. Until then the characters speak through my own messages.)*")


def webhook_name(name: str) -> str:
    """A character's name as Discord accepts it for a webhook or a username."""
    cleaned = " ".join(_FORBIDDEN_WORDS.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], name).split())
    return cleaned[:MAX_NAME_CHARS] or "character"


class NoWebhookPermission(Exception):
    """The bot cannot have webhooks in the channel: it lacks Manage Webhooks there, or
    Discord refused one for good (the channel's limit of 15)."""


class WebhookDirectory:
    """The bot's webhooks: (channel, character) → webhook, created when first needed."""

    def __init__(self, bot: discord.Client, avatar_of: Callable[[str], Awaitable[bytes | None]],
                 retry_seconds: float) -> None:
        self.bot = bot
        self.avatar_of = avatar_of
        self.retry_seconds = retry_seconds
        self._hooks: dict[tuple[int, str], discord.Webhook] = {}
        self._notices: dict[int, str] = {}  # channel → why it has no webhooks, for people
        self._ids: set[int] = set()  # every webhook the bot posts through
        self._locks: collections.defaultdict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._denied: dict[int, float] = {}  # channel → when Discord refused (monotonic)
        self._told: dict[int, float] = {}  # channel → when people were told what to grant

    def owns(self, message: discord.Message) -> bool:
        """Whether one of the bot's webhooks posted this message (one it knows, or any
        webhook of the bot's application: those it made before a restart)."""
        if message.webhook_id is None:
            return False
        application = self.bot.application_id
        return message.webhook_id in self._ids or (application is not None and message.application_id == application)

    def poster(self, channel: discord.abc.Messageable, channel_id: int, persona: str, name: str) -> WebhookPoster:
        return WebhookPoster(self, channel, channel_id, persona, name)

    def forget(self, channel_id: int, persona: str) -> None:
        self._hooks.pop((channel_id, persona), None)

    async def webhook(self, channel_id: int, persona: str, name: str) -> tuple[discord.Webhook, Any]:
        """The character's webhook in this channel (found, else created) and the thread to
        post in (MISSING outside threads). Raises `NoWebhookPermission`."""
        text_channel, thread = await self._parent(channel_id)
        key = (channel_id, persona)
        if key in self._hooks:
            return self._hooks[key], thread
        async with self._locks[text_channel.id]:
            if key in self._hooks:
                return self._hooks[key], thread
            if time.monotonic() - self._denied.get(text_channel.id, -DENIED_RECHECK_SECONDS) < DENIED_RECHECK_SECONDS:
                raise NoWebhookPermission
            wanted = webhook_name(name)
            try:
                existing = await retried(text_channel.webhooks, "list the channel's webhooks", self.retry_seconds)
                me = self.bot.user
                hook = next((w for w in existing if w.name == wanted and w.token
                             and (w.user is None or me is None or w.user.id == me.id)), None)
                if hook is None:
                    avatar = await self.avatar_of(persona)
                    hook = await retried(lambda: text_channel.create_webhook(name=wanted, avatar=avatar),
                                         "create a webhook", self.retry_seconds)
                    log.info("created the webhook of %s in channel %d", wanted, text_channel.id)
            except discord.Forbidden as error:
                log.warning("no Manage Webhooks in channel %d (%s)", text_channel.id, error)
                self._denied[text_channel.id] = time.monotonic()
                self._notices[text_channel.id] = self._notices[channel_id] = missing_permission_notice(text_channel.id)
                raise NoWebhookPermission from error
            except discord.HTTPException as error:
                if is_transient(error):
                    raise
                # Refused for good (400 30007: the channel has Discord's 15 webhooks already):
                # the characters speak through the bot's own messages, as without the permission.
                log.warning("Discord refused a webhook for %s in channel %d (%s)", wanted, text_channel.id, error)
                self._denied[text_channel.id] = time.monotonic()
                self._notices[text_channel.id] = self._notices[channel_id] = refused_notice(
                    text_channel.id, error.text or str(error))
                raise NoWebhookPermission from error
            self._denied.pop(text_channel.id, None)
            self._hooks[key] = hook
            self._ids.add(hook.id)
            return hook, thread

    async def _parent(self, channel_id: int) -> tuple[Any, Any]:
        """The channel that holds webhooks (a thread's parent) and the thread, if any."""
        channel = self.bot.get_channel(channel_id) or await self.bot.fetch_channel(channel_id)
        if isinstance(channel, discord.Thread) and channel.parent is not None:
            return channel.parent, channel
        return channel, MISSING

    async def tell_missing_permission(self, channel: discord.abc.Messageable, channel_id: int) -> None:
        """Say what to grant, at most every `NOTICE_EVERY_SECONDS` per channel (a notice: not stored)."""
        now = time.monotonic()
        if now - self._told.get(channel_id, -NOTICE_EVERY_SECONDS) < NOTICE_EVERY_SECONDS:
            return
        self._told[channel_id] = now
        notice = self._notices.get(channel_id) or missing_permission_notice(channel_id)
        try:
            await retried(lambda: channel.send(notice, allowed_mentions=NO_PINGS),
                          "say that Manage Webhooks is missing", self.retry_seconds)
        except (discord.HTTPException, OSError) as error:
            log.warning("could not say that Manage Webhooks is missing in %d: %s", channel_id, error)


class WebhookPoster:
    """Posts, edits and deletes a character's reply parts through its webhook (see
    `bot.edge.reply_stream.Poster`), under the character's name. Without the permission, or for
    parts the bot posted itself, its own messages are used."""

    def __init__(self, directory: WebhookDirectory, channel: discord.abc.Messageable, channel_id: int,
                 persona: str, name: str) -> None:
        self.directory = directory
        self.channel_id = channel_id
        self.persona = persona
        self.name = name
        self.fallback = ChannelPoster(channel)
        self._plain: set[int] = set()  # parts the bot posted itself

    async def _hook(self) -> tuple[discord.Webhook, Any]:
        return await self.directory.webhook(self.channel_id, self.persona, self.name)

    async def send(self, content: str, **extra: Any) -> int:
        try:
            return await self._send(content, extra)
        except discord.NotFound:  # the webhook was deleted meanwhile: made again once
            log.info("the webhook of %s in %d is gone; making it again", self.name, self.channel_id)
            self.directory.forget(self.channel_id, self.persona)
            return await self._send(content, extra)

    async def _send(self, content: str, extra: dict[str, Any]) -> int:
        try:
            hook, thread = await self._hook()
        except NoWebhookPermission:
            await self.directory.tell_missing_permission(self.fallback.channel, self.channel_id)
            message_id = await self.fallback.send(content, **extra)
            self._plain.add(message_id)
            return message_id
        # A webhook cannot answer with a reply reference: the question is kept in the store.
        message = await hook.send(content, username=webhook_name(self.name), allowed_mentions=NO_PINGS,
                                  view=extra.get("view", MISSING), thread=thread, wait=True)
        return message.id

    async def edit(self, message_id: int, content: str, **extra: Any) -> None:
        if message_id not in self._plain:
            try:
                hook, thread = await self._hook()
                await hook.edit_message(message_id, content=content, allowed_mentions=NO_PINGS,
                                        view=extra.get("view", MISSING), thread=thread)
                return
            except NoWebhookPermission:
                pass
            except discord.NotFound as error:
                if error.code == UNKNOWN_WEBHOOK:  # its messages can no longer be edited by anyone
                    self.directory.forget(self.channel_id, self.persona)
                    raise PartFrozen(message_id) from error
                # Unknown Message: not this webhook's, the bot posted it itself (no permission then).
        try:
            await self.fallback.edit(message_id, content, **extra)
        except discord.Forbidden as error:  # another webhook's message (one deleted and made again)
            raise PartFrozen(message_id) from error

    async def delete(self, message_id: int) -> None:
        if message_id not in self._plain:
            try:
                hook, thread = await self._hook()
                await hook.delete_message(message_id, thread=thread)
                return
            except NoWebhookPermission:
                pass
            except discord.NotFound as error:
                if error.code == UNKNOWN_WEBHOOK:
                    self.directory.forget(self.channel_id, self.persona)
                    raise
        await self._plain_call(self.fallback.delete(message_id))

    @staticmethod
    async def _plain_call(call: Awaitable[None]) -> None:
        """A part through the bot's own messages; one a webhook posted cannot be changed
        by the bot (403): left as it is, the store keeps the text."""
        try:
            await call
        except discord.Forbidden as error:
            log.info("a reply part cannot be changed without its webhook (%s)", error)
