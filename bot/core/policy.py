"""Pure decisions about Discord messages: should the bot store it, should it answer, who is
an admin. The cogs describe a message as an `Incoming` and ask these functions."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Speaking:
    """When the bot speaks in a channel to messages that do not address it (/channel speak)."""

    reply_chance: int = 0  # percent, 0..100
    follow_up_seconds: int = 0  # after the bot answered someone, their next message within this is answered
    name_trigger: bool = False  # a message that names the persona is answered


def names(text: str, name: str) -> bool:
    """Whether `text` contains `name` as a word (any case; word boundaries at its ends)."""
    name = " ".join(name.split())
    if not name:
        return False
    pattern = r"\s+".join(re.escape(part) for part in name.split(" "))
    return re.search(rf"(?<!\w){pattern}(?!\w)", text, re.IGNORECASE) is not None


def speaks_unaddressed(message: Incoming, text: str, rules: Speaking, persona_names: Sequence[str],
                       followed_up: bool, chance: Callable[[], float], reply_to_bots: bool = False) -> str | None:
    """Why the bot answers a message that `should_reply` leaves alone: "follow-up" (its
    author is within the follow-up window after the bot answered them: `followed_up`),
    "name" (it names the persona, or one of the scene's characters: `persona_names`), "chance" (the reply chance drew it: `chance()` is a
    uniform draw in [0, 1), asked only when it decides); None to stay quiet. DMs and
    enabled channels are answered anyway; the bot's own messages never, other bots only
    with `reply_to_bots`."""
    if message.from_self or (message.from_bot and not reply_to_bots) or message.is_dm or message.channel_enabled:
        return None
    if rules.follow_up_seconds > 0 and followed_up:
        return "follow-up"
    if rules.name_trigger and any(names(text, name) for name in persona_names):
        return "name"
    if rules.reply_chance > 0 and chance() * 100 < rules.reply_chance:
        return "chance"
    return None


class FollowUps:
    """Whom the bot last answered in each channel, and when (a monotonic clock): for the
    follow-up window. Bounded: the `capacity` most recently active channels are kept."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._last: OrderedDict[int, tuple[int, float]] = OrderedDict()

    def answered(self, channel_id: int, person_id: int, now: float) -> None:
        self._last[channel_id] = (person_id, now)
        self._last.move_to_end(channel_id)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def within(self, channel_id: int, person_id: int, now: float, seconds: float) -> bool:
        last = self._last.get(channel_id)
        return last is not None and last[0] == person_id and now - last[1] <= seconds


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
