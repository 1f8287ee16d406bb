"""The edge: discord.py objects in, plain data out. A message that arrives becomes one
`Arrival` in one call (`arrive`): its text, author, mentions, reference, attachment metadata,
server and channel; what follows reads that value (the history's `Message`, the policy's
`Incoming`). Also: messages read back from a channel (`to_message`), a message's files, who
may manage a channel. The decisions, the prompt and the store see only plain data; the modules that talk back to Discord (the cogs, `answering`, `reply_stream`,
`delivery`, `webhooks`, `recovery`) hold discord.py objects to send and edit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import discord

from bot.core.conversation import Message
from bot.core.policy import Incoming, is_admin, may_manage
from bot.roleplay.attachments import Attachment, notes_only, read_all


@dataclass(frozen=True)
class Arrival:
    """A Discord message that arrived, as one plain value (see the module doc)."""

    message: Message  # as the history keeps it: author, shown text, mentions, file notes, id, time
    text: str  # what the person typed, raw (mentions as <@id>): the policy matches names in it
    channel_id: int
    guild_id: int | None  # None in a DM
    author_id: int
    author_bot: bool
    author_name: str
    reference_id: int | None  # the message it replies to
    attachments: tuple[Attachment, ...]
    from_self: bool
    mentions_bot: bool
    replies_to_bot: bool

    @property
    def is_dm(self) -> bool:
        return self.guild_id is None

    @property
    def platform_id(self) -> int:
        return int(self.message.platform_id or 0)

    def incoming(self, channel_enabled: bool) -> Incoming:
        """What the policy decides on, once the channel's state is known."""
        return Incoming(from_self=self.from_self, from_bot=self.author_bot, is_dm=self.is_dm,
                        mentions_bot=self.mentions_bot, replies_to_bot=self.replies_to_bot,
                        channel_enabled=channel_enabled)


def arrive(message: discord.Message, me: discord.abc.User) -> Arrival:
    """The one conversion at the door: everything the path after it reads of `message`."""
    return Arrival(
        message=to_message(message), text=message.content, channel_id=message.channel.id,
        guild_id=guild_id_of(message), author_id=message.author.id, author_bot=message.author.bot,
        author_name=message.author.display_name,
        reference_id=message.reference.message_id if message.reference else None,
        attachments=tuple(attachments_of(message)), from_self=message.author.id == me.id,
        mentions_bot=me in message.mentions, replies_to_bot=replies_to(message, me.id),
    )


def message_text(message: discord.Message) -> str:
    """The content as people read it: mentions as @names, #channels, stickers named
    (attachments are the `attachments` of the message)."""
    text = message.clean_content
    extras = [f"[sticker: {s.name}]" for s in message.stickers]
    return "\n".join(part for part in [text, *extras] if part.strip())


def to_message(message: discord.Message) -> Message:
    return Message(
        author_id=str(message.author.id),
        author_name=message.author.display_name,
        content=message_text(message),
        is_bot=message.author.bot,
        platform_id=str(message.id),
        created_at=message.created_at,
        attachments=notes_only(attachments_of(message)),
        mentions=tuple((str(u.id), u.display_name) for u in message.mentions),
    )


def attachments_of(message: discord.Message) -> list[Attachment]:
    return [Attachment(a.filename, a.size, a.content_type) for a in message.attachments]


async def read_attachments(message: discord.Message, gate: asyncio.Semaphore | None = None) -> str:
    """The message's text files read (bounded: see `bot.roleplay.attachments`), notes for the rest."""
    return await read_all(attachments_of(message), lambda index: message.attachments[index].read(), gate=gate)


def replies_to(message: discord.Message, user_id: int) -> bool:
    resolved = message.reference.resolved if message.reference else None
    return isinstance(resolved, discord.Message) and resolved.author.id == user_id


def guild_id_of(message: discord.Message) -> int | None:
    """The message's server, None in a DM. A server the bot is not (or no longer) in is not
    cached, so `message.guild` is None there too: its id comes with the channel."""
    if message.guild is not None:
        return message.guild.id
    return getattr(message.channel, "guild_id", None)


def interaction_is_admin(interaction: discord.Interaction, admin_ids: frozenset[int]) -> bool:
    return is_admin(interaction.user.id, admin_ids, interaction.permissions.administrator)


def interaction_may_manage(interaction: discord.Interaction, admin_ids: frozenset[int]) -> bool:
    permissions = interaction.permissions
    dm = interaction.guild is None
    return dm or may_manage(interaction.user.id, admin_ids, permissions.administrator, permissions.manage_channels)
