"""Pure decisions about Discord messages: should the bot store it, should it answer, who is
an admin. The cogs describe a message as an `Incoming` and ask these functions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Incoming:
    """What the decisions need to know about a Discord message, as plain data."""

    from_self: bool
    from_bot: bool
    is_dm: bool
    mentions_bot: bool
    replies_to_bot: bool
    channel_enabled: bool


def should_reply(message: Incoming, reply_to_bots: bool = False) -> bool:
    """Answer DMs, mentions, replies to the bot, and everything in enabled channels;
    never its own messages, and other bots only when configured to."""
    if message.from_self or (message.from_bot and not reply_to_bots):
        return False
    return message.is_dm or message.mentions_bot or message.replies_to_bot or message.channel_enabled


def should_store(message: Incoming, reply_to_bots: bool = False) -> bool:
    """Keep what addresses the bot, and everything in DMs and enabled channels (where
    people chose to talk with it). Elsewhere the surrounding chat is read from Discord when
    answering and never kept. The bot's own replies are stored by the reply path."""
    if message.from_self:
        return False
    return message.is_dm or message.channel_enabled or should_reply(message, reply_to_bots)


def is_admin(user_id: int, admin_ids: frozenset[int], has_administrator: bool) -> bool:
    """Admins are the ids in ADMIN_USER_IDS and members with the Administrator permission."""
    return user_id in admin_ids or has_administrator


def may_manage(user_id: int, admin_ids: frozenset[int], has_administrator: bool, manages_channels: bool) -> bool:
    """Choosing a persona or enabling a channel: Manage Channels, or an admin."""
    return manages_channels or is_admin(user_id, admin_ids, has_administrator)


def conversation_key(channel_id: int) -> str:
    """Each channel, thread and DM channel is one conversation."""
    return f"discord:{channel_id}"


def channel_of(key: str) -> int | None:
    """The Discord channel id of a conversation key (None for other edges' keys)."""
    prefix, _, channel_id = key.partition(":")
    return int(channel_id) if prefix == "discord" and channel_id.isdigit() else None
